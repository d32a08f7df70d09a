"""Model analysis helpers shared by tools/analyze_detector.py and tools/benchmark.py.

FLOPs are counted with fvcore, attention included; one FLOP = one multiply-add, as in the paper.
"""

from __future__ import annotations

from math import prod

import torch
from detectron2.utils.analysis import FlopCountAnalysis
from fvcore.nn import FlopCountAnalysis as PlainFlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

__all__ = ["backbone_trunk", "count_flops", "flop_analysis", "sdpa_flop_jit"]


def sdpa_flop_jit(inputs, outputs) -> int:
    """``softmax(q k^T) v``: ``[.., Lq, D] x [.., D, Lk]`` plus ``[.., Lq, Lk] x [.., Lk, Dv]``."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return prod(q) * k[-2] + prod(q[:-1]) * k[-2] * v[-1]


def flop_analysis(model: nn.Module, inputs):
    """An fvcore analysis of one forward of `model` on `inputs`, attention counted.

    `inputs` is Detectron2's ``list[dict]`` for a meta-architecture, or a tuple of tensors for a
    plain module such as a backbone. `aten::scaled_dot_product_attention` is counted (fvcore has
    no handler for it); softmax, elementwise ops and pooling are not, as in ViTDet and the paper.
    """
    if isinstance(inputs, list):
        analysis = FlopCountAnalysis(model, inputs)
    else:
        analysis = PlainFlopCountAnalysis(model, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis


def count_flops(model: nn.Module, inputs) -> int:
    """Total multiply-adds of one forward of `model` on `inputs` (see `flop_analysis`)."""
    with torch.no_grad():
        return int(flop_analysis(model, inputs).total())


def backbone_trunk(model: nn.Module) -> nn.Module:
    """The network inside a detector's backbone: FPN's `bottom_up` or a simple pyramid's `net`."""
    backbone = model.backbone
    return getattr(backbone, "bottom_up", None) or getattr(backbone, "net", None) or backbone
