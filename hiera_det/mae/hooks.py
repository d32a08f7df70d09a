"""Training hooks for MAE pretraining (registered through ``train.extra_hooks``)."""

from __future__ import annotations

import logging
import os

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from .pictures import load_images, render_reconstructions, save_png

__all__ = ["MAEPicturesHook"]

logger = logging.getLogger(__name__)


class MAEPicturesHook(HookBase):
    """Every `period` iterations (and after the last), write a PNG grid of reconstructions.

    The same images and the same masks are used every time, so pictures of a run compare.

    Args:
        root: the image folder (usually the training folder).
        output_dir: pictures go to ``{output_dir}/pictures/iter_{iteration:07d}.png``.
        period: iterations between pictures (0: only after the last iteration).
        num_images: rows of the grid.
        img_size: side of the centre crop fed to the model.
        seed: seed of the fixed masks.
    """

    def __init__(
        self,
        root: str,
        output_dir: str,
        period: int = 1000,
        num_images: int = 8,
        img_size: int = 224,
        seed: int = 0,
    ):
        self.root, self.output_dir, self.period = root, output_dir, period
        self.num_images, self.img_size, self.seed = num_images, img_size, seed
        self._images = self._visible = None

    def after_step(self):
        next_iter = self.trainer.iter + 1
        last = next_iter == self.trainer.max_iter
        if last or (self.period > 0 and next_iter % self.period == 0):
            self.write(next_iter)

    def write(self, iteration: int) -> str | None:
        if not comm.is_main_process():
            return None
        model = self.trainer.model
        model = getattr(model, "module", model)  # DistributedDataParallel
        if self._images is None:
            self._images = load_images(self.root, self.num_images, self.img_size)
            generator = torch.Generator().manual_seed(self.seed)
            grid = model.unit_grid(self._images)
            self._visible = model.random_visible(len(self._images), grid, generator)
        picture = render_reconstructions(model, self._images, self._visible)
        path = os.path.join(self.output_dir, "pictures", f"iter_{iteration:07d}.png")
        save_png(picture, path)
        logger.info(f"MAE reconstructions written to {path}")
        return path
