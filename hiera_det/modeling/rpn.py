"""An RPN head whose hidden 3x3 convs are each followed by a norm (LayerNorm for Hiera/ViTDet).

The paper (Appendix A.2) follows ViTDet: "2 hidden convolution layers for the RPN and 4 hidden
convolution layers for the RoI heads ... followed by LayerNorm layers". Detectron2's
`FastRCNNConvFCHead` and `MaskRCNNConvUpsampleHead` take a `conv_norm`; its `StandardRPNHead` does
not, so this subclass adds one and changes nothing else (same prediction layers, same init, same
parameter names ``conv.conv{k}.*``, ``objectness_logits.*``, ``anchor_deltas.*``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from detectron2.config import configurable
from detectron2.layers import Conv2d, get_norm
from detectron2.modeling.proposal_generator import RPN_HEAD_REGISTRY, StandardRPNHead
from torch import nn

__all__ = ["ConvNormRPNHead"]


@RPN_HEAD_REGISTRY.register()
class ConvNormRPNHead(StandardRPNHead):
    """`StandardRPNHead` with a norm after each hidden conv: conv 3x3 -> norm -> ReLU.

    Args:
        in_channels: channels of every input feature map (FPN levels share one head).
        num_anchors: anchors per position.
        box_dim: box regression outputs per anchor.
        conv_dims: output channels of the hidden convs; -1 keeps the input width. ViTDet and
            Hiera use two: ``(-1, -1)``.
        conv_norm: what `detectron2.layers.get_norm` takes: a norm name ("LN" is the
            channels-first LayerNorm the FPN and RoI heads use; "" gives `StandardRPNHead`) or a
            callable ``channels -> module`` (the configs pass `channel_layer_norm()`, the same
            LN computed faster).
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: int,
        box_dim: int = 4,
        conv_dims: Sequence[int] = (-1, -1),
        conv_norm: str | Callable[[int], nn.Module] = "LN",
    ):
        # `StandardRPNHead.__init__` builds the convs through `_get_rpn_conv`, so the norm must be
        # known before it runs (a plain attribute may be set before `nn.Module.__init__`).
        self.conv_norm = conv_norm
        super().__init__(
            in_channels=in_channels, num_anchors=num_anchors, box_dim=box_dim, conv_dims=conv_dims
        )

    @classmethod
    def from_config(cls, cfg, input_shape):
        # For yacs configs: MODEL.RPN.HEAD_NAME = "ConvNormRPNHead", MODEL.RPN.CONV_NORM (opt.).
        ret = super().from_config(cfg, input_shape)
        ret["conv_norm"] = cfg.MODEL.RPN.get("CONV_NORM", "LN")
        return ret

    def _get_rpn_conv(self, in_channels: int, out_channels: int) -> nn.Module:
        return Conv2d(
            in_channels,
            out_channels,
            kernel_size=3,
            stride=1,
            padding=1,
            # The conv keeps its bias (StandardRPNHead's init sets every conv bias): a per-channel
            # bias is not cancelled by a LayerNorm over channels, unlike under BatchNorm.
            norm=get_norm(self.conv_norm, out_channels),
            activation=nn.ReLU(),
        )
