"""AdamW as in the paper's Table 15 (ViTDet's recipe without layer-wise lr decay)."""

import torch
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from .recipes import DETECTION

optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        # `params.model` is set to the model by train_net.py before instantiation.
        base_lr="${..lr}",
        weight_decay_norm=0.0,  # every nn.LayerNorm: Hiera's and the necks' and heads' LayerNorm2d
        overrides={"pos_embed": {"weight_decay": 0.0}, "pos_embed_win": {"weight_decay": 0.0}},
    ),
    lr=DETECTION["base"]["lr"],  # at batch 64; the size configs set it (recipes.py)
    betas=(0.9, 0.999),
    weight_decay=0.1,
)
