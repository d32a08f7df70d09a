"""Mask R-CNN, Hiera-B+, COCO, 100 epochs: Table 10 (53.5 AP box, 47.3 AP mask) with Table 15."""

from .common.mask_rcnn_hiera_100ep import dataloader, lr_multiplier, model, optimizer, train
from .common.recipes import use_detection_size

use_detection_size(model, optimizer, "base_plus")
