"""Models: the Hiera backbone and the detector parts built on it (MAE lives in `hiera_det.mae`)."""

from .hiera import (
    HIERA_LAYOUTS,
    HIERA_SIZES,
    SAM2_HIERA_SIZES,
    TIMM_ABSWIN_HIERA_SIZES,
    Hiera,
    HieraBlock,
    MaskUnitAttention,
    build_hiera,
    reroll,
    resize_pos_embed,
    unroll,
)

__all__ = [
    "HIERA_LAYOUTS",
    "HIERA_SIZES",
    "SAM2_HIERA_SIZES",
    "TIMM_ABSWIN_HIERA_SIZES",
    "Hiera",
    "HieraBlock",
    "MaskUnitAttention",
    "build_hiera",
    "reroll",
    "resize_pos_embed",
    "unroll",
]

from .norm import ChannelLayerNorm, channel_layer_norm  # noqa: E402
from .rpn import ConvNormRPNHead  # noqa: E402

__all__ += ["ChannelLayerNorm", "ConvNormRPNHead", "channel_layer_norm"]
