"""MAE's epoch-based recipe, turned into the iteration-based settings Detectron2's trainer reads."""

from __future__ import annotations

import logging

from .data import count_images

__all__ = ["resolve_epoch_schedule"]

logger = logging.getLogger(__name__)


def resolve_epoch_schedule(cfg, num_images: int | None = None):
    """Convert ``train.epochs`` & co. into iterations, in place; a no-op when ``train.epochs`` is
    absent or None. Returns `cfg`.

    Reads ``train.{epochs, warmup_epochs, base_lr, base_batch_size, checkpoint_epochs}`` and
    ``dataloader.train.{root, total_batch_size}``; `num_images` defaults to the number of images
    under ``dataloader.train.root``. Then:

    1. ``iters_per_epoch = images // total_batch_size`` (the last partial batch is dropped, as in
       MAE), at least 1;
    2. ``train.max_iter = epochs * iters_per_epoch``, unless ``train.max_iter`` is already set
       (a short run keeps the schedule's shape: the scheduler below is in fractions of training);
    3. ``lr_multiplier.warmup_length = warmup_epochs / epochs``;
    4. ``optimizer.lr = base_lr * total_batch_size / base_batch_size`` (linear scaling rule);
    5. ``train.checkpointer.period = checkpoint_epochs * iters_per_epoch``, unless set.
    """
    train = cfg.train
    epochs = train.get("epochs")
    if epochs is None:
        return cfg
    batch = cfg.dataloader.train.total_batch_size
    if num_images is None:
        num_images = count_images(cfg.dataloader.train.root)
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
    if train.checkpointer.get("period") is None and train.get("checkpoint_epochs") is not None:
        train.checkpointer.period = max(1, round(train.checkpoint_epochs * iters_per_epoch))
    logger.info(
        f"Epoch schedule: {num_images} images // batch {batch} = {iters_per_epoch} iterations per "
        f"epoch; {epochs} epochs -> max_iter {train.max_iter}; warm-up {warmup_epochs} epochs; "
        f"lr {cfg.optimizer.lr:.3g}; checkpoint every {train.checkpointer.period} iterations"
    )
    return cfg
