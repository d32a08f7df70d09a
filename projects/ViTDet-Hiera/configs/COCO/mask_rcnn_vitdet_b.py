"""Baseline: ViTDet-B Mask R-CNN (MAE ViT-B, simple feature pyramid) under the Hiera-B recipe.

Everything but the backbone is configs/mask_rcnn_hiera_b.py: LSJ 1024 data, RPN with conv+LN,
4conv1fc LN box head, LN mask head, AdamW, 100-epoch step schedule, batch 64. The backbone and
pyramid are Detectron2's `common/models/mask_rcnn_vitdet.py` (ViT-B/16, 14x14 windows with global
blocks 2, 5, 8, 11, relative positions, drop path 0.1) with the pyramid's padding contract fixed
(`hiera_det.modeling.simple_fpn`; identical at the 1024 square). Optimizer as ViTDet's ViT-B:
lr 1e-4, weight decay 0.1, layer-wise lr decay 0.7. One difference from ViTDet's own config: its
RPN convs have no norm; here the RPN is the paper's conv+LN head, as the paper trains "all
comparison detection methods" (Appendix A.2). Paper: 51.6 AP box, 45.9 AP mask (Table 10).
"""

from functools import partial

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

from hiera_det.modeling import channel_layer_norm
from hiera_det.modeling.simple_fpn import SimpleFeaturePyramid

from .....configs.mask_rcnn_hiera_b import dataloader, lr_multiplier, model, optimizer, train

model.backbone = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model.backbone
model.backbone._target_ = SimpleFeaturePyramid
model.backbone.norm = L(channel_layer_norm)()  # the LN of the Hiera configs' necks and heads

train.init_checkpoint = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth?matching_heuristics=True"
)
optimizer.lr = 1e-4
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
