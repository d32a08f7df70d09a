"""Mask R-CNN on SAM 2.1's Hiera-L trunk, COCO, 100 epochs. Unverified (no COCO number).

Drop path 0.4 and lr 3e-5: the paper's L values (Table 15, for MAE weights): the deeper model
needs more stochastic depth and a lower lr; not tuned for SAM 2.1's weights.
"""

from .common import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.size = "large"  # layout and weights follow the size
model.backbone.bottom_up.drop_path_rate = 0.4
optimizer.lr = 3e-5
