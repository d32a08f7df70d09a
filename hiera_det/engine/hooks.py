"""Training hooks for Detectron2's trainer: `DeterministicSteps` (exact resume; the data side is
`hiera_det.data.sampling`, whose docstring tells the whole scheme), `FiniteParametersCheck`
(stops a run before a checkpoint would store non-finite weights), `CheckpointBeforeEvaluation`
(an evaluation that fails loses no training) and `StopForResume` (a stop signal or a time budget
ends the run with a checkpoint of the iteration reached, to be resumed)."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..data.sampling import shared_seed, step_seed
from ..utils.signals import parse_signals

__all__ = [
    "STOPPED_EXIT_CODE",
    "BestCheckpointer",
    "CheckpointBeforeEvaluation",
    "DeterministicSteps",
    "FiniteParametersCheck",
    "StopForResume",
    "TrainingStopped",
]

logger = logging.getLogger(__name__)


class DeterministicSteps(HookBase):
    """Seeds every step from ``(seed, iteration, rank)`` and starts the data stream at the
    trainer's start iteration; checkpoints the seed. See `hiera_det.data.sampling`.

    Args:
        seed: ``train.seed``; None or < 0: a random seed shared by all processes, stored in the
            checkpoint so that ``--resume`` continues the same stream.

    The trainer's ``data_loader`` should have ``set_position(seed, start_iter)``
    (`ResumableDataLoader`, the MAE loader); with another loader a resumed run starts a new data
    stream (logged).
    """

    def __init__(self, seed: int | None = None):
        self.seed = None if seed is None or seed < 0 else int(seed)

    def before_train(self) -> None:
        if self.seed is None:
            self.seed = shared_seed(None)
        loader = self.trainer.data_loader
        if hasattr(loader, "set_position"):
            loader.set_position(self.seed, self.trainer.start_iter)
            logger.info(
                f"Data stream: seed {self.seed}, starting at iteration {self.trainer.start_iter}"
            )
        elif self.trainer.start_iter > 0:
            logger.warning(
                f"{type(loader).__name__} cannot start at iteration {self.trainer.start_iter}: "
                "the resumed run reads a new data stream"
            )

    def before_step(self) -> None:
        seed_all_rng(step_seed(self.seed, self.trainer.iter, comm.get_rank()))

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seed = state_dict["seed"]


class FiniteParametersCheck(HookBase):
    """Raise `FloatingPointError` (naming the tensors) when a parameter holds NaN or inf after a
    step that a checkpoint would save. Register it before the `PeriodicCheckpointer`: the last
    good checkpoint then stays the last one.

    (A non-finite *loss* already stops Detectron2's trainer before the optimizer step; this
    catches a finite loss whose update overflowed.)

    Args:
        period: the checkpoint period; the check also runs after the last iteration.
        eval_period: if > 0, also every `eval_period` iterations (`CheckpointBeforeEvaluation`
            saves there).
    """

    def __init__(self, period: int, eval_period: int = 0):
        self.period = period
        self.eval_period = eval_period

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        before_eval = self.eval_period > 0 and next_iter % self.eval_period == 0
        if next_iter % self.period and next_iter != self.trainer.max_iter and not before_eval:
            return
        model = self.trainer.model
        params = [(n, p) for n, p in model.named_parameters()]
        finite = torch.stack([p.detach().isfinite().all() for _, p in params]).cpu()
        if bool(finite.all()):
            return
        bad = [n for (n, _), ok in zip(params, finite.tolist()) if not ok]
        raise FloatingPointError(
            f"after iteration {self.trainer.iter} {len(bad)} parameters hold NaN or inf (e.g. "
            f"{', '.join(bad[:5])}); training stopped without writing this checkpoint. Resume "
            "from the last one with a lower learning rate or stronger gradient clipping."
        )


class CheckpointBeforeEvaluation(HookBase):
    """Save a checkpoint after every iteration that Detectron2's `EvalHook` evaluates after,
    when `checkpointer` (the `PeriodicCheckpointer` hook) has not just saved one: a failing
    evaluation (e.g. a test image changed on disk) then loses no training, ``--resume`` goes on
    from there. Register it after the `PeriodicCheckpointer` and before the `EvalHook` (Detectron2
    runs hooks in order); after the last iteration the checkpointer saves ``model_final`` anyway.

    Args:
        checkpointer: the run's `PeriodicCheckpointer` hook (on the main process).
        eval_period: ``train.eval_period``, as given to `EvalHook` (0: no periodic evaluation).
    """

    def __init__(self, checkpointer: hooks.PeriodicCheckpointer, eval_period: int):
        self.checkpointer = checkpointer
        self.eval_period = eval_period

    def after_step(self) -> None:
        iteration = self.trainer.iter
        next_iter = iteration + 1
        if self.eval_period <= 0 or next_iter % self.eval_period:
            return
        if next_iter >= self.trainer.max_iter or next_iter % self.checkpointer.period == 0:
            return  # the checkpointer has saved this iteration
        self.checkpointer.save(
            f"{self.checkpointer.file_prefix}_{iteration:07d}", iteration=iteration
        )


# The exit status of a run that stopped to be resumed: EX_TEMPFAIL of sysexits.h ("temporary
# failure; the user is invited to retry"), distinct from success (0) and from failure (1, or
# 128 + N for a process killed by signal N).
STOPPED_EXIT_CODE = 75


class TrainingStopped(BaseException):
    """The run stopped after iteration `iteration` with a checkpoint of it (`StopForResume`), to
    be resumed. A `BaseException`, like `KeyboardInterrupt`: Detectron2's trainer logs an
    `Exception` as a failure, while this passes its ``finally`` (the hooks' ``after_train``) on
    its way to train_net.py, which exits with `STOPPED_EXIT_CODE`."""

    def __init__(self, iteration: int, reason: str):
        super().__init__(f"stopped after iteration {iteration} ({reason}) to be resumed")
        self.iteration, self.reason = iteration, reason


class StopForResume(HookBase):
    """End the run at the end of the iteration in which a stop signal arrived, or the last one
    that fits a time budget, with a checkpoint of that iteration, then raise `TrainingStopped`.

    The signal handler only records the signal (a second one changes nothing; once one came the
    signals are ignored from the end of training on, as the process is exiting). After every step
    the processes agree through one all-reduce whether any of them wants to stop, so they all
    stop after the same iteration, whichever processes got the signal and when. The main process
    saves ``model_<iteration>.pth`` through `checkpointer` (atomic; ``last_checkpoint`` names it)
    unless the periodic checkpointer has just saved that iteration; all processes wait for the
    save before raising. Register it after the `PeriodicCheckpointer` and before the `EvalHook`:
    a stop then does not wait for an evaluation. At the last iteration nothing is stopped: the
    run ends as usual.

    Args:
        checkpointer: the run's `PeriodicCheckpointer` hook on the main process, None elsewhere.
        signals: names or numbers of the signals that stop the run (``train.stop_signals``).
        max_hours: a wall-clock budget from the start of training (``train.max_hours``), None for
            none: the run stops after the first iteration after which another iteration as long
            as the longest so far (step and hooks) would end later than `margin_s` before the
            budget runs out.
        margin_s: seconds kept for the checkpoint and the exit (``train.stop_margin_s``).
    """

    def __init__(
        self,
        checkpointer: hooks.PeriodicCheckpointer | None,
        signals: Sequence[str | int] = ("SIGTERM", "SIGUSR1"),
        max_hours: float | None = None,
        margin_s: float = 120.0,
    ):
        self.checkpointer = checkpointer
        self.signals = parse_signals(signals)
        self.budget_s = None if max_hours is None else float(max_hours) * 3600.0
        self.margin_s = float(margin_s)
        self.received: signal.Signals | None = None
        self._previous: dict = {}
        self._start = self._last_end = 0.0
        self._longest_step = 0.0  # from one after_step to the next: the step and every hook

    def _record(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            logger.warning(
                f"{self.received.name} received during iteration {self.trainer.iter}: stopping "
                "after this iteration"
            )

    def before_train(self) -> None:
        self._previous = {s: signal.signal(s, self._record) for s in self.signals}
        self._start = self._last_end = time.monotonic()

    def after_train(self) -> None:
        if self.received is not None:
            # The process is stopping: further signals must not end it before it exits with
            # STOPPED_EXIT_CODE (SIG_IGN, unlike a Python handler, outlasts Python's shutdown).
            for sig in self.signals:
                signal.signal(sig, signal.SIG_IGN)
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _reason(self) -> str | None:
        """Why this process wants to stop now, or None."""
        now = time.monotonic()
        self._longest_step = max(self._longest_step, now - self._last_end)
        self._last_end = now
        if self.received is not None:
            return self.received.name
        if self.budget_s is not None:
            if now + self._longest_step > self._start + self.budget_s - self.margin_s:
                return f"train.max_hours={self.budget_s / 3600:g} is nearly spent"
        return None

    def after_step(self) -> None:
        reason = self._reason()
        if not _any_process(reason is not None):
            return
        iteration = self.trainer.iter
        if iteration + 1 >= self.trainer.max_iter:
            return  # the last iteration: the run ends by itself
        reason = reason or "another process was told to stop"
        period = self.checkpointer.period if self.checkpointer else 0
        if self.checkpointer is not None and (iteration + 1) % period:
            self.checkpointer.save(
                f"{self.checkpointer.file_prefix}_{iteration:07d}", iteration=iteration
            )
        comm.synchronize()  # no process exits before the checkpoint is written
        raise TrainingStopped(iteration, reason)


def _any_process(flag: bool) -> bool:
    """Whether `flag` is True on any process of the run (one all-reduce; no-op alone)."""
    if comm.get_world_size() == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class BestCheckpointer(hooks.BestCheckpointer):
    """Detectron2's `BestCheckpointer` (same arguments, plus `metrics_file`) that a resumed run
    starts from the best value logged before it: the best `val_metric` in `metrics_file`
    (Detectron2's ``metrics.json``) up to the iteration resumed from, if its checkpoint file
    exists. Without it, the first evaluation after a restart would replace a better
    ``model_best.pth``."""

    def __init__(self, *args, metrics_file: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._metrics_file = metrics_file

    def before_train(self) -> None:
        path = os.path.join(self._checkpointer.save_dir, f"{self._file_prefix}.pth")
        if self.trainer.iter == 0 or not os.path.isfile(path):
            return
        for value, iteration in _logged(self._metrics_file, self._val_metric, self.trainer.iter):
            if self.best_metric is None or self._compare(value, self.best_metric):
                self._update_best(value, iteration)
        if self.best_metric is not None:
            logger.info(
                f"{self._val_metric} best so far: {self.best_metric:0.5f} at iteration "
                f"{self.best_iter} ({path})"
            )


def _logged(metrics_file: str, key: str, up_to: int) -> list[tuple[float, int]]:
    """(value, iteration) of `key` in a ``metrics.json`` (a JSON object per line; lines a
    killed run left cut are skipped), for iterations up to `up_to`."""
    try:
        with open(metrics_file) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and key in row and row.get("iteration", up_to + 1) <= up_to:
            found.append((float(row[key]), row["iteration"]))
    return found
