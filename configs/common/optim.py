"""AdamW as in the paper's Table 15 (ViTDet's recipe without layer-wise lr decay)."""

import torch
from detectron2.config import LazyCall as L

from hiera_det.engine import get_optimizer_params

optimizer = L(torch.optim.AdamW)(
    params=L(get_optimizer_params)(
        # `params.model` is set to the model by train_net.py before instantiation.
        base_lr="${..lr}",
        weight_decay_norm=0.0,  # every norm, Detectron2's channels-first "LN" included
        overrides={"pos_embed": {"weight_decay": 0.0}, "pos_embed_win": {"weight_decay": 0.0}},
    ),
    lr=3.5e-5,  # Hiera-B at batch 64
    betas=(0.9, 0.999),
    weight_decay=0.1,
)
