"""Training length from epochs: where epochs, batch sizes and image counts become iterations,
learning rates and periods.

- `iterations_for` and `step_lr_multiplier`: ViTDet's step schedule, written into the detection
  configs when they load. ViTDet's "100 epoch" COCO schedule at batch 64 is 184375 iterations
  (100 x 118k images / 64; ViTDet rounds train2017's 118287 images to 118k), decays the lr by 10x
  at 8/9 and 26/27 of training (iterations 163889 and 177546) and warms up linearly for 250
  iterations from 0.001x. Its LVIS epoch is 100k images: 156250 iterations.
- `resolve_epoch_schedule`: a config that gives ``train.epochs`` (MAE's) instead of
  ``train.max_iter`` is turned into iterations when the run starts, from the number of training
  images it finds (``train_net.py`` calls it before training).
"""

from __future__ import annotations

import logging

from detectron2.config import LazyCall as L
from detectron2.data import DatasetCatalog
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

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


def resolve_epoch_schedule(cfg, num_images: int | None = None):
    """Convert ``train.epochs`` & co. into iterations, in place; a no-op when ``train.epochs`` is
    absent or None. Returns `cfg`.

    Reads ``train.{epochs, warmup_epochs, base_lr, base_batch_size, checkpoint_epochs,
    eval_epochs}`` and ``dataloader.train.total_batch_size``; `num_images` defaults to
    `count_training_images` of ``dataloader.train``. Then:

    1. ``iters_per_epoch = images // total_batch_size`` (the last partial batch is dropped, as in
       MAE), at least 1;
    2. ``train.max_iter = epochs * iters_per_epoch``, unless ``train.max_iter`` is already set
       (a short run keeps the schedule's shape: the scheduler below is in fractions of training);
    3. ``lr_multiplier.warmup_length = warmup_epochs / epochs``;
    4. ``optimizer.lr = base_lr * total_batch_size / base_batch_size`` (linear scaling rule), if
       ``base_lr`` is given (``base_batch_size`` defaults to 256);
    5. ``train.checkpointer.period = checkpoint_epochs * iters_per_epoch`` and
       ``train.eval_period = eval_epochs * iters_per_epoch``, each unless set or not given.
    """
    train = cfg.train
    epochs = train.get("epochs")
    if epochs is None:
        return cfg
    batch = cfg.dataloader.train.total_batch_size
    if num_images is None:
        num_images = count_training_images(cfg.dataloader.train)
    iters_per_epoch = max(1, num_images // batch)
    if train.get("max_iter") is None:
        train.max_iter = round(epochs * iters_per_epoch)
    else:
        logger.info(f"train.max_iter={train.max_iter} given: it replaces train.epochs={epochs}")
    warmup_epochs = train.get("warmup_epochs", 0)
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"train.warmup_epochs={warmup_epochs} must be in [0, {epochs})")
    cfg.lr_multiplier.warmup_length = warmup_epochs / epochs
    if train.get("base_lr") is not None:
        cfg.optimizer.lr = train.base_lr * batch / train.get("base_batch_size", 256)
    _set_periods(train, iters_per_epoch)
    logger.info(
        f"Epoch schedule: {num_images} images // batch {batch} = {iters_per_epoch} iterations per "
        f"epoch; {epochs} epochs -> max_iter {train.max_iter}; warm-up {warmup_epochs} epochs; "
        f"lr {cfg.optimizer.lr:.3g}; checkpoint every {train.checkpointer.period} iterations"
    )
    return cfg


def _set_periods(train, iters_per_epoch: int) -> None:
    """Step 5 of `resolve_epoch_schedule`: periods in epochs -> iterations (at least 1)."""
    if train.checkpointer.get("period") is None and train.get("checkpoint_epochs") is not None:
        train.checkpointer.period = max(1, round(train.checkpoint_epochs * iters_per_epoch))
    if train.get("eval_period") is None and train.get("eval_epochs") is not None:
        train.eval_period = max(1, round(train.eval_epochs * iters_per_epoch))
