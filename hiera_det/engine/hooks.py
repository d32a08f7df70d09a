"""Training hooks for Detectron2's trainer: `DeterministicSteps` (exact resume; the data side is
`hiera_det.data.sampling`, whose docstring tells the whole scheme), `FiniteParametersCheck`
(stops a run before a checkpoint would store non-finite weights) and `CheckpointBeforeEvaluation`
(an evaluation that fails loses no training)."""

from __future__ import annotations

import logging

import torch
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..data.sampling import shared_seed, step_seed

__all__ = ["CheckpointBeforeEvaluation", "DeterministicSteps", "FiniteParametersCheck"]

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
