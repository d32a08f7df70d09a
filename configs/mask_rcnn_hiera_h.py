"""Mask R-CNN, Hiera-H, COCO, 100 epochs. NOT from the paper (it trains no H detector): drop path
and lr are our choice, with the reasons in common/recipes.py. Unverified: no COCO number. If memory
is short at 1024 px, set model.backbone.bottom_up.use_act_checkpoint=True."""

from .common.mask_rcnn_hiera_100ep import dataloader, lr_multiplier, model, optimizer, train
from .common.recipes import use_detection_size

use_detection_size(model, optimizer, "huge")
