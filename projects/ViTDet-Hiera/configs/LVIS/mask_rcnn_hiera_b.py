"""Mask R-CNN, Hiera-B, LVIS v1, 100 epochs: configs/mask_rcnn_hiera_b.py (backbone, FPN, heads,
LSJ, AdamW, step schedule) moved to LVIS as ViTDet's LVIS configs do (common/lvis.py).

Not in the paper. Learning rate: ViTDet doubles its COCO lr for LVIS (1e-4 -> 2e-4 for B and L);
we do the same to Hiera-B's COCO lr (3.5e-5 -> 7e-5). Unverified: no AP measured.
"""

from .....configs.common.schedule import step_lr_multiplier
from .....configs.mask_rcnn_hiera_b import dataloader, model, optimizer, train
from ..common.lvis import LVIS_100EP_ITERS, to_lvis

to_lvis(dataloader, model)
train.max_iter = LVIS_100EP_ITERS  # 156250
train.eval_period = 30000  # an LVIS evaluation takes long: ViTDet's period
lr_multiplier = step_lr_multiplier(train.max_iter)  # decays at 138889 and 150463, as ViTDet
optimizer.lr = 7e-5
