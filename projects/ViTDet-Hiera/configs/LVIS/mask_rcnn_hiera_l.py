"""Mask R-CNN, Hiera-L, LVIS v1, 100 epochs: configs/mask_rcnn_hiera_l.py (backbone, FPN, heads,
LSJ, AdamW, step schedule) moved to LVIS as ViTDet's LVIS configs do (common/lvis.py).

Not in the paper. Learning rate: ViTDet doubles its COCO lr for LVIS (1e-4 -> 2e-4 for B and L);
we do the same to Hiera-L's COCO lr (3e-5 -> 6e-5). Unverified: no AP measured.
"""

from .....configs.mask_rcnn_hiera_l import dataloader, model, optimizer, train
from ..common.lvis import to_lvis, to_lvis_schedule

to_lvis(dataloader, model)
lr_multiplier = to_lvis_schedule(train, optimizer)  # 156250 iterations, lr 3e-5 x 2 = 6e-5
