"""Mask R-CNN on SAM 2.1's Hiera-S trunk, COCO, 100 epochs. Our choice, unverified (no COCO number).

Drop path and lr: those of our MAE-initialised Hiera-S config (drop path 0.1, lr 3.5e-5), for the
reason given in `mask_rcnn_hiera_t.py`.
"""

from .common import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.size = "small"  # layout and weights follow the size
model.backbone.bottom_up.drop_path_rate = 0.1  # lr 3.5e-5: B's recipe
