"""train_net.py stopped by a cluster and resumed, end to end with real signals sent to real
processes (CPU, gloo): after SIGTERM or SIGUSR1 every process stops after the same iteration, the
main one saves it, the job exits with status 75 ("stopped to be resumed"), and ``--resume`` gives
the losses of a run never stopped. One process and two (Detectron2's ``--num-gpus 2``), the signal
sent to one rank or to the whole process group (data loader workers included), the MAE, a signal
while evaluating, repeated signals while saving, and a time budget (``train.max_hours``).

Raw per-step losses come from `run_hooks.RawLossWriter` (Detectron2's metrics.json logs 20-step
medians, whose window a resumed run restarts)."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import shrink_overrides
from train_net_runs import (
    DETECTION_CONFIG,
    MAE_CONFIG,
    assert_same_losses,
    finish,
    rank_pids,
    read_losses,
    run,
    start,
    wait_for_step,
)

from hiera_det.engine.hooks import STOPPED_EXIT_CODE

pytestmark = pytest.mark.slow

MAX_ITER = 8
TWO_PROCESSES = ("--num-gpus", "2", "--dist-url", "auto")


@pytest.fixture(scope="module")
def opts(tiny_coco) -> list[str]:
    """A tiny detector on the 4-image dataset, 8 steps, no periodic checkpoint before the end;
    one data loader worker per process (the workers must not act on the signals)."""
    return shrink_overrides(64) + [
        f"dataset.train=[stop_train,{tiny_coco.json_file},{tiny_coco.image_root}]",
        f"dataset.test=[stop_test,{tiny_coco.json_file},{tiny_coco.image_root}]",
        "dataloader.train.num_workers=1",
        f"train.max_iter={MAX_ITER}",
        "train.checkpointer.period=100",
        "train.log_period=1",
        "train.eval_period=0",
        "train.seed=11",
    ]


@pytest.fixture(scope="module")
def reference(opts, tmp_path_factory) -> dict[int, dict]:
    """Losses of an uninterrupted one-process run."""
    output = tmp_path_factory.mktemp("stop_reference")
    run(DETECTION_CONFIG, output, opts)
    return read_losses(output)


@pytest.fixture(scope="module")
def reference_two(opts, tmp_path_factory) -> dict[int, dict]:
    """Losses of an uninterrupted two-process run."""
    output = tmp_path_factory.mktemp("stop_reference_two")
    run(DETECTION_CONFIG, output, opts, *TWO_PROCESSES)
    return read_losses(output)


def _stopped_at(output: Path) -> int:
    """The iteration of the checkpoint `last_checkpoint` names (after checking it loads)."""
    name = (output / "last_checkpoint").read_text().strip()
    checkpoint = torch.load(output / name, map_location="cpu", weights_only=True)
    assert name == f"model_{checkpoint['iteration']:07d}.pth"
    return checkpoint["iteration"]


def _received_during(output: Path) -> int:
    """The first iteration during which a process of the run in `output` got a stop signal (each
    process logs it into log.txt, log.txt.rank1, ...)."""
    text = "".join(p.read_text() for p in output.glob("log.txt*"))
    found = [int(i) for i in re.findall(r"SIG\w+ received during iteration (\d+)", text)]
    assert found, text[-3000:]
    return min(found)


def _stop_then_resume(config, output, opts, send, *extra) -> int:
    """Start a run, call ``send(process)`` once step 2 is logged, check that the run stopped
    with status 75 within one iteration of the signal, resume it; return the stopped
    iteration."""
    process = start(config, output, opts, *extra)
    wait_for_step(process, output, 2)
    send(process)
    assert finish(process, output) == STOPPED_EXIT_CODE, (output / "run.log").read_text()[-3000:]
    stopped, received = _stopped_at(output), _received_during(output)
    # After the iteration the signal arrived in; the next one if it came after that
    # iteration's check (during the later hooks of its step).
    assert received >= 2 and stopped in (received, received + 1), (received, stopped)
    assert "to be resumed" in (output / "run.log").read_text()
    run(config, output, opts, "--resume", *extra)
    return stopped


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_one_process_stops_saves_and_resumes_exactly(opts, reference, tmp_path, signum):
    stopped = _stop_then_resume(DETECTION_CONFIG, tmp_path, opts, lambda p: os.kill(p.pid, signum))
    assert f"{signum.name} received during iteration" in (tmp_path / "run.log").read_text()
    assert_same_losses(read_losses(tmp_path), reference, stopped + 1, MAX_ITER - 1)


@pytest.mark.parametrize("target", ["rank 1 only", "every process of the job"])
def test_two_processes_agree_on_the_last_iteration(opts, reference_two, tmp_path, target):
    def send(process):
        if target == "rank 1 only":
            os.kill(rank_pids(tmp_path, 2)[1], signal.SIGTERM)
        else:  # as SLURM does: the spawning process, both ranks and their loader workers
            os.killpg(process.pid, signal.SIGTERM)

    stopped = _stop_then_resume(DETECTION_CONFIG, tmp_path, opts, send, *TWO_PROCESSES)
    assert_same_losses(read_losses(tmp_path), reference_two, stopped + 1, MAX_ITER - 1)


def test_repeated_signals_while_saving_leave_a_loadable_checkpoint(opts, reference, tmp_path):
    """SIGTERM every 20 ms from step 2 on, while the run saves and exits."""

    def send(process):
        while process.poll() is None:
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
            time.sleep(0.02)

    stopped = _stop_then_resume(DETECTION_CONFIG, tmp_path, opts, send)
    assert_same_losses(read_losses(tmp_path), reference, stopped + 1, MAX_ITER - 1)


def test_a_signal_during_evaluation_stops_after_it_with_checkpoints(opts, reference, tmp_path):
    """The evaluation after step 2 (its checkpoint written before it) receives SIGTERM: it ends,
    and the run stops after step 3 with a checkpoint of it."""
    evaluating = [
        "train.eval_period=3",
        "dataloader.evaluator._target_=run_hooks.SignalDuringEvaluation",
    ]
    process = start(DETECTION_CONFIG, tmp_path, opts + evaluating)
    assert finish(process, tmp_path) == STOPPED_EXIT_CODE, (tmp_path / "run.log").read_text()
    log = (tmp_path / "run.log").read_text()
    assert "Evaluation results for bbox" in log  # the evaluation ran to its end
    assert torch.load(tmp_path / "model_0000002.pth", weights_only=True)["iteration"] == 2
    assert _stopped_at(tmp_path) == 3
    run(DETECTION_CONFIG, tmp_path, opts, "--resume")
    assert_same_losses(read_losses(tmp_path), reference, 4, MAX_ITER - 1)


def test_mae_stops_saves_and_resumes_exactly(mae_images, tmp_path):
    opts = [
        "model.encoder.embed_dim=16",
        "model.encoder.num_heads=1",
        "model.encoder.stages=[1,1,2,1]",
        "model.encoder.pretrain_img_size=64",
        "model.decoder_embed_dim=32",
        "model.decoder_depth=1",
        "model.decoder_num_heads=2",
        f"dataloader.train.root={mae_images}",
        "dataloader.train.img_size=64",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=1",
        f"train.max_iter={MAX_ITER}",
        "train.checkpointer.period=100",
        "train.log_period=1",
        "train.seed=5",
        "train.device=cpu",
    ]
    run(MAE_CONFIG, tmp_path / "full", opts)
    send = lambda process: os.kill(process.pid, signal.SIGUSR1)  # noqa: E731
    stopped = _stop_then_resume(MAE_CONFIG, tmp_path / "stopped", opts, send)
    reference = read_losses(tmp_path / "full")
    assert_same_losses(read_losses(tmp_path / "stopped"), reference, stopped + 1, MAX_ITER - 1)


def test_a_time_budget_stops_the_run_before_it_runs_out(opts, tmp_path):
    """A 1-minute budget with 20 s kept for the exit, for a run far longer than that."""
    budget = ["train.max_iter=100000", f"train.max_hours={1 / 60}", "train.stop_margin_s=20"]
    begun = time.monotonic()
    process = start(DETECTION_CONFIG, tmp_path, opts + budget)
    assert finish(process, tmp_path) == STOPPED_EXIT_CODE, (tmp_path / "run.log").read_text()
    log = (tmp_path / "run.log").read_text()
    assert "train.max_hours=0.0166667 is nearly spent" in log
    losses = read_losses(tmp_path)
    assert _stopped_at(tmp_path) == max(losses) + 1 >= 2  # its own row is not written
    # The budget counts from the first step; start-up (building, data checks) comes before.
    assert time.monotonic() - begun < 60 + 120


def test_torchrun_passes_sigterm_to_its_workers_which_stop_and_save(opts, reference_two, tmp_path):
    """SIGTERM to torchrun (what Kubernetes sends the container): its agent passes it on to the
    two workers, which save and exit with 75; ``--resume`` gives the uninterrupted losses."""
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    process = start(DETECTION_CONFIG, tmp_path, opts, launcher=torchrun)
    wait_for_step(process, tmp_path, 2)
    os.kill(process.pid, signal.SIGTERM)
    returncode = finish(process, tmp_path)
    log = (tmp_path / "run.log").read_text()
    assert returncode != 0 and "to be resumed" in log, log[-3000:]
    stopped = _stopped_at(tmp_path)
    assert stopped in (_received_during(tmp_path), _received_during(tmp_path) + 1)
    run(DETECTION_CONFIG, tmp_path, opts, "--resume", *TWO_PROCESSES)
    assert_same_losses(read_losses(tmp_path), reference_two, stopped + 1, MAX_ITER - 1)
