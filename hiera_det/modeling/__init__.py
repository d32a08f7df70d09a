"""Models: the Hiera backbone (and, built on it, the detector parts and the MAE model)."""

from .hiera import (
    HIERA_SIZES,
    Hiera,
    HieraBlock,
    MaskUnitAttention,
    build_hiera,
    reroll,
    resize_pos_embed,
    unroll,
)

__all__ = [
    "HIERA_SIZES",
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

from .mae import MaskedAutoencoderHiera, build_mae, convert_mae_checkpoint  # noqa: E402

__all__ += ["MaskedAutoencoderHiera", "build_mae", "convert_mae_checkpoint"]
