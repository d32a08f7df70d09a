"""hiera_det.engine.launch in one process: what torchrun's and SLURM's variables say, the
messages for partial or contradictory ones, mixing with Detectron2's flags, a process outside its
group stopping before it writes, and the resume after an elastic restart. (The processes
themselves are started in tests/test_train_net_distributed.py.)"""

from __future__ import annotations

import argparse
import logging

import pytest
from conftest import load_script
from detectron2.engine import default_argument_parser

from hiera_det.engine.launch import (
    LauncherEnv,
    LaunchError,
    check_in_launcher_group,
    find_launcher_env,
    first_slurm_host,
    launch_from_args,
    local_gpu,
    resume_after_restart,
    slurm_default_port,
)

TORCHRUN_ENV = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29500",
    "TORCHELASTIC_RUN_ID": "job",
}
SRUN_ENV = {  # task 3 of `srun --nodes=2 --ntasks-per-node=2` in job 123456
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
}


def test_torchrun_variables():
    assert find_launcher_env(TORCHRUN_ENV) == LauncherEnv("torchrun", 3, 4, 1, 2, "env://")


@pytest.mark.parametrize("missing", ["RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"])
def test_partial_torchrun_variables_name_what_is_missing(missing):
    env = {k: v for k, v in TORCHRUN_ENV.items() if k != missing}
    with pytest.raises(LaunchError, match=f"but not {missing}"):
        find_launcher_env(env)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"RANK": "4"}, r"rank 4 is not in \[0, 4\)"),
        ({"LOCAL_RANK": "0"}, "consecutive ranks per machine"),
        ({"WORLD_SIZE": "3", "RANK": "1"}, "consecutive ranks per machine"),
        ({"RANK": "three"}, "RANK='three' is not an integer"),
    ],
)
def test_contradictory_torchrun_variables(change, message):
    with pytest.raises(LaunchError, match=message):
        find_launcher_env({**TORCHRUN_ENV, **change})


def test_srun_task_variables():
    env = find_launcher_env(SRUN_ENV)
    assert env == LauncherEnv("SLURM", 3, 4, 1, 2, f"tcp://gpu007:{slurm_default_port(123456)}")
    assert 15000 <= slurm_default_port(123456) < 35000
    explicit = find_launcher_env({**SRUN_ENV, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert explicit.init_method == "tcp://head:1234"
    # srun torchrun ...: torchrun's workers are the group.
    assert find_launcher_env({**SRUN_ENV, **TORCHRUN_ENV}).launcher == "torchrun"


def test_one_process_under_slurm_is_no_group(monkeypatch, caplog):
    one_task = {**SRUN_ENV, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"}
    one_task.update(SLURM_STEP_NUM_TASKS="1", SLURM_STEP_TASKS_PER_NODE="1")
    assert find_launcher_env(one_task) is None
    # The batch script itself (no srun step) is one process, whatever SLURM_NTASKS says.
    batch = {k: v for k, v in SRUN_ENV.items() if not k.startswith("SLURM_STEP")}
    batch.update(SLURM_PROCID="0", SLURM_LOCALID="0")
    assert find_launcher_env(batch) is None
    assert find_launcher_env({}) is None
    for key in [*TORCHRUN_ENV, *SRUN_ENV]:
        monkeypatch.delenv(key, raising=False)
    for key, value in batch.items():
        monkeypatch.setenv(key, value)
    ran = []
    with caplog.at_level(logging.WARNING, logger="hiera_det.engine.launch"):
        launch_from_args(ran.append, args := _args())
    assert ran == [args]
    assert "SLURM_NTASKS=4 but this process is not a task of an srun step" in caplog.text


def test_uneven_tasks_per_node_are_refused():
    with pytest.raises(LaunchError, match=r"SLURM_STEP_TASKS_PER_NODE='2\(x1\),1'"):
        find_launcher_env({**SRUN_ENV, "SLURM_STEP_NUM_TASKS": "3", "SLURM_PROCID": "1",
                           "SLURM_STEP_TASKS_PER_NODE": "2(x1),1"})  # fmt: skip


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node1", "node1"),
        ("gpu[007-009,012]", "gpu007"),
        ("gpu[3,5]-ib,cpu1", "gpu3-ib"),
        ("a1,b[1-2]", "a1"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def _args(*argv: str) -> argparse.Namespace:
    return default_argument_parser().parse_args(["--config-file", "x.py", *argv])


@pytest.mark.parametrize(
    "flags",
    [["--num-gpus", "2"], ["--num-machines", "2", "--machine-rank", "1"], ["--dist-url", "auto"]],
)
def test_detectron2_flags_under_torchrun_stop_with_a_message(flags, monkeypatch):
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    ran = []
    with pytest.raises(LaunchError, match=f"{flags[0]} .*started by torchrun as rank 3 of 4"):
        launch_from_args(ran.append, _args(*flags))
    assert ran == []


def test_train_net_exits_with_the_message(monkeypatch, capsys):
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("sys.argv", ["train_net.py", "--config-file", "x.py", "--num-gpus", "2"])
    train_net = load_script("train_net.py", "train_net_launch")
    with pytest.raises(SystemExit, match="train_net.py: --num-gpus 2: this process was started"):
        train_net.invoke_main()


def test_without_a_launcher_detectron2_launch_runs(monkeypatch):
    for key in [*TORCHRUN_ENV, *SRUN_ENV]:
        monkeypatch.delenv(key, raising=False)
    ran = []
    launch_from_args(ran.append, args := _args())
    assert ran == [args]


def test_a_process_outside_its_group_writes_nothing(monkeypatch, tmp_path):
    """WORLD_SIZE=2 in the environment but main() called in a process of its own (world size 1):
    stopped before the output folder is created."""
    for key, value in {**TORCHRUN_ENV, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(LaunchError, match="rank 0 of 2, but it is rank 0 of a process group of 1"):
        check_in_launcher_group()
    train_net = load_script("train_net.py", "train_net_launch")
    output = tmp_path / "out"
    args = _args(f"train.output_dir={output}")
    with pytest.raises(LaunchError, match="same output folder"):
        train_net.main(args)
    assert not output.exists()


def test_elastic_restart_resumes_from_the_last_checkpoint(monkeypatch, tmp_path, caplog):
    args = _args()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert not resume_after_restart(args, str(tmp_path)) and not args.resume
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    with caplog.at_level(logging.INFO, logger="detectron2"):
        assert resume_after_restart(args, str(tmp_path)) and args.resume
        assert f"resuming from the start: {tmp_path} has no checkpoint yet" in caplog.text
        (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
        resume_after_restart(_args(), str(tmp_path))
    assert (
        "torchrun restarted the worker group (restart 2): resuming from its last checkpoint "
        f"{tmp_path / 'model_0000009.pth'}"
    ) in caplog.text


def test_slurm_requeue_resumes_from_the_last_checkpoint(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth")
    args = _args()
    with caplog.at_level(logging.INFO, logger="detectron2"):
        assert resume_after_restart(args, str(tmp_path)) and args.resume
    assert (
        "SLURM requeued the job (restart 1): resuming from its last checkpoint "
        f"{tmp_path / 'model_0000004.pth'}"
    ) in caplog.text


def test_local_gpu_choice(monkeypatch):
    env = LauncherEnv("torchrun", 3, 4, 1, 2, "env://")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert local_gpu(env) == 1
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)  # srun --gpus-per-task=1
    assert local_gpu(env) == 0
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    with pytest.raises(LaunchError, match="2 processes on this machine but 0 visible GPUs"):
        local_gpu(env)
