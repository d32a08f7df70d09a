"""A faster Detectron2 "LN": the channels-first LayerNorm of the FPN and the RPN/RoI heads.

Detectron2's `detectron2.layers.LayerNorm` (what ``get_norm("LN", C)`` builds) normalises a
``[N, C, H, W]`` map over C with eight elementwise passes (mean, subtract, square, mean, add,
sqrt, divide, scale and shift). On the stride-4 FPN level at 1024 px (256 x 256 x 256) that is
most of what the FPN and the RPN head cost on a CPU, and under bf16 autocast it also returns fp32
(its fp32 weight promotes the product), so the next conv casts the map back. `ChannelLayerNorm`
computes the same function with one fused `F.layer_norm` over a channels-last view: the input
dtype is kept, the result is a channels-last-strided ``[N, C, H, W]`` tensor (convolutions take it
as it is), and its parameters (``weight``, ``bias``) and state-dict keys are Detectron2's, so a
checkpoint trained with either loads into the other. Measured in `docs/detection.md`.

Configs pass it where Detectron2 takes a norm (``norm=`` / ``conv_norm=``): a callable
``channels -> module``, built lazily by ``L(channel_layer_norm)()``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch.nn.functional as F
from detectron2.layers.batch_norm import LayerNorm
from torch import Tensor

__all__ = ["ChannelLayerNorm", "channel_layer_norm"]


class ChannelLayerNorm(LayerNorm):
    """Detectron2's `LayerNorm` (over the channels of ``[N, C, H, W]``), fused.

    A subclass, so code that recognises Detectron2's LN (e.g. the optimizer's no-weight-decay
    groups, `hiera_det.engine.optim`) recognises this one.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"ChannelLayerNorm expects [N, C, H, W], got shape {tuple(x.shape)}")
        y = F.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return y.permute(0, 3, 1, 2)


def channel_layer_norm(eps: float = 1e-6) -> Callable[[int], ChannelLayerNorm]:
    """The ``norm`` argument for Detectron2's FPN and heads: ``channels -> ChannelLayerNorm``
    (Detectron2's ``"LN"`` computed faster; same eps default)."""
    return functools.partial(ChannelLayerNorm, eps=eps)
