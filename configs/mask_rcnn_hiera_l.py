"""Mask R-CNN, Hiera-L, COCO, 100 epochs: Table 10 (55.0 AP box, 48.6 AP mask) with Table 15."""

from .common.mask_rcnn_hiera_100ep import dataloader, lr_multiplier, model, optimizer, train
from .common.recipes import use_detection_size

use_detection_size(model, optimizer, "large")
