"""Mask R-CNN on SAM 2.1's Hiera-B+ trunk, COCO, 100 epochs. Unverified (no COCO number).

Drop path 0.2 and lr 3.5e-5: the paper's B+ values (Table 15, for MAE weights), kept because SAM
2.1's encoder has the same size and was trained at the detector's 1024 px; not tuned for it.
"""

from .common import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.size = "base_plus"  # layout and weights follow the size
# Drop path 0.2, lr 3.5e-5 and the rest: common.py (the paper's B/B+ recipe).
