"""Mask R-CNN, Hiera-L, COCO, 100 epochs: Table 10 (55.0 AP box, 48.6 AP mask) with Table 15."""

from .common.mask_rcnn_hiera_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.size = "large"  # global blocks and weights follow the size
model.backbone.bottom_up.drop_path_rate = 0.4
optimizer.lr = 3e-5
