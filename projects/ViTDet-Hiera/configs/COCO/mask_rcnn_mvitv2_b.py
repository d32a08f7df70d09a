"""Baseline: MViTv2-B Mask R-CNN (supervised ImageNet-21K weights, FPN) under the Hiera-B recipe.

Everything but the backbone is configs/mask_rcnn_hiera_b.py: FPN with LN, LSJ 1024 data, RPN with
conv+LN, 4conv1fc LN box head, LN mask head, AdamW, 100-epoch step schedule, batch 64. Backbone and
optimizer as ViTDet's MViTv2-B (projects/ViTDet/configs/COCO/cascade_mask_rcnn_mvitv2_b_in21k_
100ep.py): depth 24 with stage ends (1, 4, 20, 23), residual pooling, drop path 0.4, lr 8e-5,
weight decay 0.1, no layer-wise decay, the IN-21K checkpoint Detectron2 hosts. Paper (Table 10):
53.1 / 47.4 AP box / mask with IN-21K weights, 52.4 / 46.7 with IN-1K weights.
"""

from functools import partial

from detectron2.config import LazyCall as L
from detectron2.modeling import MViT
from torch import nn

from .....configs.mask_rcnn_hiera_b import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up = L(MViT)(
    embed_dim=96,
    depth=24,
    num_heads=1,
    last_block_indexes=(1, 4, 20, 23),
    residual_pooling=True,
    drop_path_rate=0.4,
    norm_layer=partial(nn.LayerNorm, eps=1e-6),
    out_features=("scale2", "scale3", "scale4", "scale5"),
)
model.backbone.in_features = "${.bottom_up.out_features}"

train.init_checkpoint = "detectron2://ImageNetPretrained/mvitv2/MViTv2_B_in21k.pyth"
optimizer.lr = 8e-5
