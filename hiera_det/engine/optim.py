"""Optimizer parameter groups."""

from __future__ import annotations

from typing import Any

from detectron2.layers.batch_norm import LayerNorm as ChannelsFirstLayerNorm
from detectron2.solver.build import get_default_optimizer_params, reduce_param_groups
from torch import nn


def get_optimizer_params(
    model: nn.Module, *, weight_decay_norm: float | None = 0.0, **kwargs: Any
) -> list[dict[str, Any]]:
    """Detectron2's `get_default_optimizer_params`, applying `weight_decay_norm` to *every* norm.

    Detectron2 recognises `torch.nn.LayerNorm` but not its own channels-first
    `detectron2.layers.LayerNorm` (the "LN" of `get_norm`, used by the FPN and the RoI/RPN heads),
    whose weights would silently be decayed. Other arguments are passed through unchanged.
    """
    groups = get_default_optimizer_params(model, weight_decay_norm=weight_decay_norm, **kwargs)
    if weight_decay_norm is None:
        return groups
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, ChannelsFirstLayerNorm)
        for p in m.parameters(recurse=False)
    }
    out = []
    for group in groups:
        plain = [p for p in group["params"] if id(p) not in norm_params]
        norms = [p for p in group["params"] if id(p) in norm_params]
        if plain:
            out.append({**group, "params": plain})
        if norms:
            out.append({**group, "params": norms, "weight_decay": weight_decay_norm})
    return reduce_param_groups(out)
