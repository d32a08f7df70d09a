"""Mask R-CNN, Hiera-T, COCO, 100 epochs. NOT from the paper (it trains no T detector): drop path
and lr are our choice, with the reasons in common/recipes.py. Unverified: no COCO number."""

from .common.mask_rcnn_hiera_100ep import dataloader, lr_multiplier, model, optimizer, train
from .common.recipes import use_detection_size

use_detection_size(model, optimizer, "tiny")
