"""train_net.py in subprocesses, for the end-to-end tests: run it with hooks that record each
step's raw losses (`run_hooks`), kill a run at a chosen point and resume it, and compare losses
step by step with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = ROOT / "train_net.py"
DETECTION_CONFIG = ROOT / "configs/mask_rcnn_hiera_b.py"
MAE_CONFIG = ROOT / "configs/mae/mae_hiera_t.py"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    "OMP_NUM_THREADS": "1",  # CPU results must not depend on how many threads are free
}


def command(
    config: Path, output: Path, opts: list[str], *extra: str, launcher: tuple[str, ...] = ()
) -> list[str]:
    hook = (
        f"[{{_target_:run_hooks.RawLossWriter,path:'{output / 'losses.jsonl'}'}},"
        f"{{_target_:run_hooks.InitialWeightsWriter,path:'{output / 'initial.pth'}'}},"
        f"{{_target_:run_hooks.PidWriter,folder:'{output}'}}]"
    )
    return [
        sys.executable, *launcher, str(TRAIN_NET), "--config-file", str(config), *extra, *opts,
        f"train.output_dir={output}", f"train.extra_hooks={hook}",
    ]  # fmt: skip


def run(config, output, opts, *extra, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command(config, output, opts, *extra),
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_losses(output: Path) -> dict[int, dict]:
    """iteration -> raw losses of that step; a resumed run's rows replace the killed run's."""
    rows = [json.loads(line) for line in (output / "losses.jsonl").read_text().splitlines()]
    return {r["iteration"]: r for r in rows}


def logged(output: Path, iteration: int) -> bool:
    """Whether the run in `output` has finished step `iteration` (RawLossWriter's row)."""
    path = output / "losses.jsonl"
    return path.exists() and f'"iteration": {iteration},' in path.read_text()


def run_killed_then_resumed(config, output, opts, kill_after: str) -> int:
    """Start a run, SIGKILL it as soon as `kill_after` holds (a checkpoint file that exists: right
    after that save; ``"step N"``: step N logged, i.e. between checkpoints), resume it; return the
    iteration the resumed run started at."""
    process = subprocess.Popen(
        command(config, output, opts), cwd=ROOT, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if kill_after.startswith("step "):
        reached = lambda: logged(output, int(kill_after.split()[1]))  # noqa: E731
    else:
        reached = (output / kill_after).exists
    deadline = time.monotonic() + 600
    while not reached():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"the run never reached {kill_after!r}"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    pointer = output / "last_checkpoint"
    last = pointer.read_text().strip() if pointer.exists() else None  # None: killed mid-first-save
    result = run(config, output, opts, "--resume")
    if last is None:
        return 0
    assert f"Loading from {output / last}" in result.stdout + result.stderr
    return int(last[len("model_") : -len(".pth")]) + 1


def assert_same_losses(resumed: dict, reference: dict, first: int, last: int) -> None:
    assert set(range(first, last + 1)) <= set(resumed)
    for it in range(first, last + 1):
        assert resumed[it].keys() == reference[it].keys()
        for key, value in reference[it].items():
            assert resumed[it][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (it, key)


def copypaste(log: str) -> list[str]:
    """Detectron2's `copypaste:` result lines (task names, metric names and values)."""
    return [line.split("copypaste: ", 1)[1] for line in log.splitlines() if "copypaste: " in line]


def assert_same_ap_tables(one: Path, two: Path) -> None:
    """The AP tables that an ``--eval-only`` run of one process logged into `one` and one of two
    processes into `two` are the same (and are real box and mask tables, not zeros)."""
    tables = copypaste((one / "log.txt").read_text())
    two_log = (two / "log.txt").read_text()
    assert "World size: 2" in two_log
    assert tables == copypaste(two_log)
    assert [line for line in tables if line.startswith("Task: ")] == ["Task: bbox", "Task: segm"]
    values = [float(v) for line in tables[2::3] for v in line.split(",") if v != "nan"]
    assert values and any(v > 0 for v in values)  # a real comparison, not zeros against zeros


def start(config, output, opts, *extra, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start train_net.py as the leader of a new process group (``start_new_session``: the group
    holds it, the processes it spawns and their data loader workers); stdout and stderr go to
    `output`/run.log."""
    output.mkdir(parents=True, exist_ok=True)
    log = open(output / "run.log", "a")  # noqa: SIM115 -- closed with the process (finish)
    return subprocess.Popen(
        command(config, output, opts, *extra, launcher=launcher), cwd=ROOT, env=ENV, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def wait_for_step(process: subprocess.Popen, output: Path, iteration: int) -> None:
    """Wait until the run in `output` has logged step `iteration` (it must still be running)."""
    deadline = time.monotonic() + 600
    while not logged(output, iteration):
        assert process.poll() is None, (output / "run.log").read_text()[-3000:]
        assert time.monotonic() < deadline, f"the run never reached step {iteration}"
        time.sleep(0.02)


def rank_pids(output: Path, world_size: int) -> dict[int, int]:
    """rank -> pid of the training processes of the run in `output` (`run_hooks.PidWriter`)."""
    deadline = time.monotonic() + 600
    while len(pids := _read_pids(output)) < world_size:
        assert time.monotonic() < deadline, f"{world_size} processes never started"
        time.sleep(0.02)
    return pids


def _read_pids(output: Path) -> dict[int, int]:
    return {int(p.stem.split("_")[1]): int(p.read_text()) for p in output.glob("pid_*.txt")}


def finish(process: subprocess.Popen, output: Path, timeout: float = 600) -> int:
    """Wait for the run to end; return its exit status."""
    process.wait(timeout=timeout)
    return process.returncode
