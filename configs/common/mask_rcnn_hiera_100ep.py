"""The paper's COCO recipe (Sec. 5, App. A.2, Table 15): Mask R-CNN + Hiera-B, LSJ 1024, AdamW,
100 epochs at batch 64 with ViTDet's step schedule. The size configs import this and override the
Hiera size, drop path and lr; the global blocks and the initial weights follow the size.
"""

from hiera_det.engine.schedule import iterations_for, step_lr_multiplier

from .coco_lsj import dataloader
from .mask_rcnn_hiera import model
from .optim import optimizer
from .train import train

train.max_iter = iterations_for(epochs=100, batch_size=64)  # 184375
lr_multiplier = step_lr_multiplier(train.max_iter)
# optimizer.lr is the recipe's at batch 64: with train.epochs=N (a dataset of one's own,
# docs/own_data.md) it is scaled linearly to dataloader.train.total_batch_size.
train.base_batch_size = 64
# The MAE pretraining of the backbone's size (the paper fine-tunes MAE weights, not the IN-1K
# classifier): an interpolation, so that overriding the size changes the weights too.
train.init_checkpoint = (
    "https://dl.fbaipublicfiles.com/hiera/mae_hiera_${model.backbone.bottom_up.size}_224.pth"
)
