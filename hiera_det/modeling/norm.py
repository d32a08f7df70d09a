"""The LayerNorm of the FPN and the RPN/RoI heads: timm's `LayerNorm2d`, as a Detectron2 ``norm``.

The paper's detector puts a channels-first LayerNorm after every hidden conv of the FPN and the
heads (Detectron2's ``"LN"``, `detectron2.layers.batch_norm.LayerNorm`). Detectron2's LN computes it
with eight elementwise passes and, under bf16 autocast, returns fp32 (its fp32 weight promotes the
product), so the next conv casts the map back. timm's `LayerNorm2d` computes the same function with
one fused `F.layer_norm` over a channels-last view, keeps the input dtype, has the same parameter
names (``weight``, ``bias``) and is an `nn.LayerNorm`, so Detectron2's
`get_default_optimizer_params` exempts it from weight decay (``weight_decay_norm``) as it does every
`nn.LayerNorm`. Measured in docs/detection.md.

Configs pass it where Detectron2 takes a norm (``norm=`` / ``conv_norm=``): a callable
``channels -> module``, built lazily by ``L(channel_layer_norm)()``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from timm.layers import LayerNorm2d

__all__ = ["channel_layer_norm"]


def channel_layer_norm(eps: float = 1e-6) -> Callable[[int], LayerNorm2d]:
    """The ``norm`` argument for Detectron2's FPN and heads: ``channels -> LayerNorm2d``
    (Detectron2's ``"LN"``, computed in one fused op; the same eps default)."""
    return functools.partial(LayerNorm2d, eps=eps)
