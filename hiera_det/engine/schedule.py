"""Training length from epochs: where epochs, batch sizes and image counts become iterations,
learning rates and periods.

- `iterations_for` and `step_lr_multiplier`: ViTDet's step schedule, written into the detection
  configs when they load. ViTDet's "100 epoch" COCO schedule at batch 64 is 184375 iterations
  (100 x 118k images / 64; ViTDet rounds train2017's 118287 images to 118k), decays the lr by 10x
  at 8/9 and 26/27 of training (iterations 163889 and 177546) and warms up linearly for 250
  iterations from 0.001x. Its LVIS epoch is 100k images: 156250 iterations.
- `resolve_epoch_schedule`: a config that gives ``train.epochs`` (MAE's recipe, or
  ``train.epochs=N`` on a detection config for a dataset of one's own) is turned into iterations,
  lr and periods when the run starts, from the number of training images it finds
  (``train_net.py`` calls it before training).
"""

from __future__ import annotations

import logging

from detectron2.config import LazyCall as L
from detectron2.data import DatasetCatalog
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

from ..data.images import count_images

__all__ = [
    "COCO_TRAIN_IMAGES",
    "count_training_images",
    "iterations_for",
    "resolve_epoch_schedule",
    "step_lr_multiplier",
]

logger = logging.getLogger(__name__)

COCO_TRAIN_IMAGES = 118_000  # as ViTDet counts an epoch


def iterations_for(epochs: float, batch_size: int, images: int = COCO_TRAIN_IMAGES) -> int:
    """Training iterations for `epochs` passes over `images` at `batch_size` images per step
    (ViTDet's count: the whole run rounded, ``round(epochs * images / batch_size)``)."""
    return round(epochs * images / batch_size)


def step_lr_multiplier(max_iter: int, warmup_iters: int = 250):
    """Warm-up, then x0.1 at 8/9 and x0.01 at 26/27 of `max_iter` (fractions of training: the
    trainer evaluates the scheduler at ``iter / train.max_iter``, so a shorter run keeps the shape).
    """
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, 0.1, 0.01],
            milestones=[round(max_iter * 8 / 9), round(max_iter * 26 / 27)],
            num_updates=max_iter,
        ),
        warmup_length=warmup_iters / max_iter,
        warmup_method="linear",
        warmup_factor=0.001,
    )


def count_training_images(train_loader) -> int:
    """The images of one epoch of a ``dataloader.train`` config: the files under its ``root`` (an
    image folder: MAE), else the dicts registered under its ``dataset.names`` (detection)."""
    if "root" in train_loader:
        try:
            return count_images(train_loader.root)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"dataloader.train.root: {e}") from e
    names = train_loader.dataset.names
    names = [names] if isinstance(names, str) else list(names)
    return sum(len(DatasetCatalog.get(name)) for name in names)


def resolve_epoch_schedule(cfg, num_images: int | None = None, given=None):
    """Convert ``train.epochs`` & co. into iterations, in place; a no-op when ``train.epochs`` is
    absent or None. Returns `cfg`. One implementation for MAE (a recipe in epochs) and detection
    (a recipe in iterations, which ``train.epochs=N`` replaces for a dataset of one's own).

    Reads ``train.{epochs, warmup_epochs, base_lr, base_batch_size, checkpoint_epochs,
    eval_epochs}`` and ``dataloader.train.total_batch_size``; `num_images` defaults to
    `count_training_images` of ``dataloader.train``. A key in iterations that is *given* stays:
    `given` is the set of keys set on the command line (train_net.py passes them); None counts
    every key with a value as given. Then:

    1. ``iters_per_epoch = images // total_batch_size`` (the last partial batch is dropped, as in
       MAE), at least 1;
    2. ``train.max_iter = epochs * iters_per_epoch`` (a given max_iter keeps the schedule's shape:
       the lr schedulers are in fractions of training);
    3. ``lr_multiplier.warmup_length = warmup_epochs / epochs`` (warmup_epochs None: the
       config's warm-up fraction);
    4. ``optimizer.lr = base_lr * total_batch_size / base_batch_size`` (linear scaling rule;
       ``base_batch_size`` defaults to 256); without ``base_lr``, the config's ``optimizer.lr``
       is the lr at ``base_batch_size`` (detection: the recipe's, at 64);
    5. ``train.checkpointer.period = checkpoint_epochs * iters_per_epoch`` and
       ``train.eval_period = eval_epochs * iters_per_epoch``, where given in epochs.
    """
    train = cfg.train
    epochs = train.get("epochs")
    if epochs is None:
        return cfg
    stays = _given_keys(cfg, given)
    batch = cfg.dataloader.train.total_batch_size
    if num_images is None:
        num_images = count_training_images(cfg.dataloader.train)
    iters_per_epoch = max(1, num_images // batch)
    if "train.max_iter" in stays:
        logger.info(f"train.max_iter={train.max_iter} given: it replaces train.epochs={epochs}")
    else:
        train.max_iter = max(1, round(epochs * iters_per_epoch))
    _set_warmup(cfg, epochs, stays)
    scaled_from = _set_lr(cfg, batch, stays)
    _set_periods(train, iters_per_epoch, stays)
    logger.info(_describe(cfg, num_images, iters_per_epoch, scaled_from))
    return cfg


_ITERATION_KEYS = (
    "train.max_iter",
    "train.eval_period",
    "train.checkpointer.period",
    "optimizer.lr",
    "lr_multiplier.warmup_length",
)


def _given_keys(cfg, given) -> set[str]:
    """The keys in iterations that stay (see `resolve_epoch_schedule`)."""
    present = {k for k in _ITERATION_KEYS if OmegaConf.select(cfg, k) is not None}
    return present if given is None else present & set(given)


def _set_warmup(cfg, epochs: float, stays: set[str]) -> None:
    """Step 3 of `resolve_epoch_schedule`."""
    warmup_epochs = cfg.train.get("warmup_epochs")
    if warmup_epochs is None or "lr_multiplier.warmup_length" in stays:
        if cfg.lr_multiplier.get("warmup_length") is None:
            cfg.lr_multiplier.warmup_length = 0.0
        return
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"train.warmup_epochs={warmup_epochs} must be in [0, {epochs})")
    cfg.lr_multiplier.warmup_length = warmup_epochs / epochs


def _set_lr(cfg, batch: int, stays: set[str]) -> tuple[float, int] | None:
    """Step 4 of `resolve_epoch_schedule`; returns the (lr, batch) scaled from, if it was."""
    if "optimizer.lr" in stays:
        return None
    base_lr, base_batch = cfg.train.get("base_lr"), cfg.train.get("base_batch_size")
    if base_lr is None:  # detection: the config's lr is the recipe's, at base_batch_size
        base_lr = cfg.optimizer.get("lr")
        if base_lr is None or base_batch is None:
            return None
    base_batch = base_batch or 256
    cfg.optimizer.lr = base_lr * batch / base_batch
    return base_lr, base_batch


def _set_periods(train, iters_per_epoch: int, stays: set[str]) -> None:
    """Step 5 of `resolve_epoch_schedule`: periods in epochs -> iterations (at least 1)."""
    if "train.checkpointer.period" not in stays and train.get("checkpoint_epochs") is not None:
        train.checkpointer.period = max(1, round(train.checkpoint_epochs * iters_per_epoch))
    if "train.eval_period" not in stays and train.get("eval_epochs") is not None:
        train.eval_period = max(1, round(train.eval_epochs * iters_per_epoch))


def _decays(cfg) -> list[int]:
    """The iterations where the lr schedule steps down (a multi-step schedule), else []."""
    scheduler = cfg.lr_multiplier.get("scheduler") or {}
    milestones, updates = scheduler.get("milestones"), scheduler.get("num_updates")
    if not milestones or not updates:
        return []
    return [round(m / updates * cfg.train.max_iter) for m in milestones]


def _describe(cfg, num_images: int, iters_per_epoch: int, scaled_from) -> str:
    """The resolved schedule in one sentence, for the log."""
    train, batch = cfg.train, cfg.dataloader.train.total_batch_size
    warmup = round(cfg.lr_multiplier.warmup_length * train.max_iter)
    lr = f"lr {cfg.optimizer.lr:.3g}"
    if scaled_from is not None:
        lr += f" ({scaled_from[0]:.3g} at batch {scaled_from[1]}, scaled linearly to {batch})"
    decays = _decays(cfg)
    steps = f", x0.1 at iterations {', '.join(map(str, decays))}" if decays else ""
    evaluation = train.get("eval_period")
    return (
        f"Schedule: train.epochs={train.epochs} of {num_images} training images at batch {batch} "
        f"({iters_per_epoch} iterations per epoch) -> {train.max_iter} iterations, warm-up "
        f"{warmup}, {lr}{steps}; checkpoint every {train.checkpointer.period}"
        + (f" and evaluation every {evaluation}" if evaluation else "")
        + " iterations"
    )
