"""Mask R-CNN, Hiera-S, COCO, 100 epochs. NOT from the paper (it trains no S detector): our choice.

Hiera-T's recipe (configs/mask_rcnn_hiera_t.py, which gives the reasoning: drop path 0.1, B's lr
3.5e-5, batch 64 and everything else) at size S. Unverified: there is no COCO number to compare
with.
"""

from .mask_rcnn_hiera_t import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.size = "small"  # global blocks and weights follow the size
