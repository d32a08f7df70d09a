"""Mask R-CNN, Hiera-B, COCO, 100 epochs: Table 10 (52.2 AP box, 46.3 AP mask) with Table 15."""

from .common.mask_rcnn_hiera_100ep import dataloader, lr_multiplier, model, optimizer, train

# Everything of Hiera-B (lr 3.5e-5, drop path 0.2, batch 64) is the base recipe.
