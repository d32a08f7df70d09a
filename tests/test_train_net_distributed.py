"""train_net.py started the way clusters start PyTorch, end to end in subprocesses on the CPU
(gloo): torchrun's two workers are one run of world size 2 that trains as Detectron2's
``--num-gpus 2`` does; a worker killed under ``--max-restarts=1`` is restarted and the run goes on
from the last checkpoint with the losses of a run never stopped; ``--eval-only`` under torchrun
prints one process's AP tables; an srun task's SLURM variables start a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shrink_overrides
from train_net_runs import assert_same_ap_tables, assert_same_losses, read_losses

pytestmark = pytest.mark.slow  # end to end: the full suite, not the fast tier

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/quickstart.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))},
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    "OMP_NUM_THREADS": "1",  # CPU results must not depend on how many threads are free
}
MAX_ITER = 6


@pytest.fixture(scope="module")
def opts(tiny_coco) -> list[str]:
    """The quickstart config shrunk to a tiny model on the 4-image dataset, 6 steps of batch 2."""
    return shrink_overrides(64) + [
        f"dataset.train=[launch_train,{tiny_coco.json_file},{tiny_coco.image_root}]",
        f"dataset.test=[launch_test,{tiny_coco.json_file},{tiny_coco.image_root}]",
        f"train.max_iter={MAX_ITER}",
        "train.checkpointer.period=2",
        "train.log_period=1",
        "train.seed=11",
        "model.roi_heads.box_predictor.test_score_thresh=0.0",  # detections for every image
    ]


def _run(launcher: list[str], output: Path, opts: list[str], *extra: str, env=None) -> str:
    """Run train_net.py into `output` (raw losses per step in losses.jsonl, plus `hooks`);
    return its stdout + stderr."""
    hooks = [f"{{_target_:run_hooks.RawLossWriter,path:'{output / 'losses.jsonl'}'}}"]
    hooks += [h for h in extra if h.startswith("{")]
    command = [
        *launcher, str(ROOT / "train_net.py"), "--config-file", str(CONFIG),
        *[e for e in extra if not e.startswith("{")], *opts,
        f"train.output_dir={output}", f"train.extra_hooks=[{','.join(hooks)}]",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def torchrun_run(opts, tmp_path_factory) -> Path:
    """The output folder of an uninterrupted ``torchrun --nproc_per_node=2`` run."""
    output = tmp_path_factory.mktemp("torchrun")
    _run(TORCHRUN, output, opts)
    return output


def test_torchrun_is_one_run_of_world_size_2_like_num_gpus_2(opts, torchrun_run, tmp_path):
    log, log_rank1 = ((torchrun_run / name).read_text() for name in ("log.txt", "log.txt.rank1"))
    assert "Rank of current process: 0. World size: 2" in log
    assert "Rank of current process: 1. World size: 2" in log_rank1
    metrics = [
        json.loads(line) for line in (torchrun_run / "metrics.json").read_text().splitlines()
    ]
    assert [m["iteration"] for m in metrics if "total_loss" in m] == list(range(MAX_ITER))
    # Rank 0 alone writes checkpoints (rank 1 logs into log.txt.rank1).
    saved = [line.rsplit("/", 1)[1] for line in log.splitlines() if "Saving checkpoint" in line]
    assert saved == [
        "model_0000001.pth",
        "model_0000003.pth",
        "model_0000005.pth",
        "model_final.pth",
        "model_best.pth",  # after the evaluation at the end (train.best_checkpoint)
    ]
    assert "Saving checkpoint" not in log_rank1

    spawned = tmp_path / "spawned"
    _run([sys.executable], spawned, opts, "--num-gpus", "2", "--dist-url", "auto")
    reference = read_losses(spawned)
    assert sorted(reference) == list(range(MAX_ITER))
    assert len({round(r["total_loss"], 6) for r in reference.values()}) == MAX_ITER
    assert_same_losses(read_losses(torchrun_run), reference, 0, MAX_ITER - 1)


def test_killed_worker_is_restarted_and_resumes_like_an_uninterrupted_run(
    opts, torchrun_run, tmp_path
):
    """Rank 1 dies before step 5; step 4 needed both ranks' gradients, so rank 0 had saved
    model_0000003.pth (after step 3) before: the restarted group goes on from step 4."""
    kill = "{_target_:run_hooks.KillFirstWorkerGroupOnce,iteration:5,rank:1}"
    _run([*TORCHRUN, "--max-restarts=1"], tmp_path, opts, kill)
    log = (tmp_path / "log.txt").read_text()
    assert (
        "torchrun restarted the worker group (restart 1): resuming from its last checkpoint "
        f"{tmp_path / 'model_0000003.pth'}"
    ) in log
    assert log.count("Starting training from iteration 0") == 1
    assert "Starting training from iteration 4" in log
    assert (tmp_path / "model_final.pth").is_file()
    losses, reference = read_losses(tmp_path), read_losses(torchrun_run)
    assert sorted(losses) == list(range(MAX_ITER))
    assert_same_losses(losses, reference, 4, MAX_ITER - 1)


def test_eval_only_under_torchrun_prints_the_tables_of_one_process(opts, torchrun_run, tmp_path):
    opts = opts + [f"train.init_checkpoint={torchrun_run / 'model_final.pth'}"]
    _run([sys.executable], tmp_path / "one", opts, "--eval-only")
    _run(TORCHRUN, tmp_path / "two", opts, "--eval-only")
    assert_same_ap_tables(tmp_path / "one", tmp_path / "two")


def test_srun_task_of_one_trains_as_one_process(opts, tmp_path):
    """SLURM's variables of ``srun --ntasks=1`` (no torchrun variables): one process, trained."""
    env = {
        **ENV,
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_STEP_NUM_TASKS": "1",
        "SLURM_STEP_TASKS_PER_NODE": "1",
        "SLURM_STEP_NODELIST": "localhost",
    }
    _run([sys.executable], tmp_path, opts + ["train.max_iter=2"], env=env)
    assert "Rank of current process: 0. World size: 1" in (tmp_path / "log.txt").read_text()
    assert sorted(read_losses(tmp_path)) == [0, 1]
