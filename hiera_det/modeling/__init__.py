"""Models: the Hiera backbone (`hiera`) and the detector parts built on it (`rpn`, `roi_heads`,
`norm`, `simple_fpn`). MAE lives in `hiera_det.mae`."""

from .hiera import (
    HIERA_LAYOUTS,
    HIERA_SIZES,
    SAM2_HIERA_SIZES,
    TIMM_ABSWIN_HIERA_SIZES,
    Hiera,
    build_hiera,
    reroll,
    resize_pos_embed,
    unroll,
)
from .norm import channel_layer_norm
from .rpn import ConvNormRPNHead

__all__ = [
    "Hiera",
    "build_hiera",
    "HIERA_SIZES",
    "HIERA_LAYOUTS",
    "SAM2_HIERA_SIZES",
    "TIMM_ABSWIN_HIERA_SIZES",
    "ConvNormRPNHead",
    "channel_layer_norm",
    "reroll",
    "resize_pos_embed",
    "unroll",
]
