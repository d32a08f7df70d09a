"""Cascade Mask R-CNN, Hiera-B, COCO, 100 epochs: configs/mask_rcnn_hiera_b.py (same backbone, FPN,
LSJ data, optimizer and schedule) with ViTDet's three-stage cascade of box heads.

Not in the paper (its Table 10 is Mask R-CNN only); ViTDet trains its ViT, MViTv2 and Swin
backbones this way. No AP measured yet.
"""

from .....configs.mask_rcnn_hiera_b import dataloader, lr_multiplier, model, optimizer, train
from ..common.cascade import to_cascade

to_cascade(model)
