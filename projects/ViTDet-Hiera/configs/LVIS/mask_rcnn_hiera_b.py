"""Mask R-CNN, Hiera-B, LVIS v1, 100 epochs: configs/mask_rcnn_hiera_b.py (backbone, FPN, heads,
LSJ, AdamW, step schedule) moved to LVIS as ViTDet's LVIS configs do (common/lvis.py).

Not in the paper. Learning rate: ViTDet doubles its COCO lr for LVIS (1e-4 -> 2e-4 for B and L);
we do the same to Hiera-B's COCO lr (3.5e-5 -> 7e-5). Unverified: no AP measured.
"""

from .....configs.mask_rcnn_hiera_b import dataloader, model, optimizer, train
from ..common.lvis import to_lvis, to_lvis_schedule

to_lvis(dataloader, model)
lr_multiplier = to_lvis_schedule(train, optimizer)  # 156250 iterations, lr 3.5e-5 x 2 = 7e-5
