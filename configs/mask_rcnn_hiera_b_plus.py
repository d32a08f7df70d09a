"""Mask R-CNN, Hiera-B+, COCO, 100 epochs: Table 10 (53.5 AP box, 47.3 AP mask) with Table 15."""

from .common.mask_rcnn_hiera import spread_global_blocks
from .common.mask_rcnn_hiera_100ep import dataloader, lr_multiplier, model, optimizer, train

SIZE = "base_plus"
model.backbone.bottom_up.size = SIZE
model.backbone.bottom_up.global_blocks = spread_global_blocks(SIZE)
model.backbone.bottom_up.drop_path_rate = 0.2
optimizer.lr = 3.5e-5
train.init_checkpoint = f"https://dl.fbaipublicfiles.com/hiera/mae_hiera_{SIZE}_224.pth"
