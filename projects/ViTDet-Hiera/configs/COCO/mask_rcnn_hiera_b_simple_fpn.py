"""Mask R-CNN, Hiera-B, COCO, 100 epochs, with ViTDet's simple feature pyramid built from Hiera's
stage 3 (stride 16) instead of the FPN over all four stages: configs/mask_rcnn_hiera_b.py with
the neck replaced (stage 4 is not built). Compare with that config for the neck alone.

Not in the paper; the recipe (lr, drop path, schedule, LSJ) is the FPN config's. No AP measured.
"""

from .....configs.mask_rcnn_hiera_b import dataloader, lr_multiplier, model, optimizer, train
from ..common.simple_fpn import to_simple_feature_pyramid

to_simple_feature_pyramid(model, train)
