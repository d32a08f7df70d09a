"""Mask R-CNN, Hiera-H, COCO, 100 epochs. NOT from the paper (it trains no H detector): our choice.

Reasoning: H has L's depth (2, 6, 36, 4) at 1.8x the width. Going from B to L the paper raises drop
path 0.2 -> 0.4 and lowers lr 3.5e-5 -> 3e-5 (Table 15). For H we take ViTDet's step from L to H in
drop path (0.4 -> 0.5) and keep L's lr 3e-5 (no data point to extrapolate a further decrease from),
batch 64. If memory is short at 1024 px, set model.backbone.bottom_up.use_act_checkpoint=True.
Unverified: there is no COCO number to compare with.
"""

from .mask_rcnn_hiera_l import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.size = "huge"  # global blocks and weights follow the size
model.backbone.bottom_up.drop_path_rate = 0.5  # lr 3e-5 and the rest: L's recipe
