"""Mask R-CNN on SAM 2.1's Hiera-S trunk, COCO, 100 epochs. Unverified (no COCO number): drop
path and lr are those of the size's MAE-initialised config (common/recipes.py), not tuned here."""

from ..common.recipes import use_detection_size
from .common import dataloader, lr_multiplier, model, optimizer, train

use_detection_size(model, optimizer, "small")
