"""Detectron2's RoI heads, fed feature maps that RoIAlign can read without copying them again.

The FPN's maps come out of its `LayerNorm2d` (`hiera_det.modeling.norm`) channels-last strided.
torchvision's `roi_align` makes its input contiguous (and, under autocast, casts it to fp32) on
every call, so the box
pooler and the mask pooler each copy every pooled FPN level, and under bf16/fp16 autocast each
copies it twice (cast, then layout). These heads lay the pooled levels out once, as one contiguous
fp32 copy under autocast (contiguous in the maps' own dtype otherwise), before Detectron2's own
`forward` runs; `roi_align` then finds nothing to do.

In fp32 the results are those of Detectron2's heads, bit for bit. Under bf16/fp16 autocast they
are more exact: Detectron2's `ROIAlign` casts the RoI boxes to the maps' dtype, so with bf16 maps
every box corner is rounded to bf16 (steps of 2 px between 256 and 512 px, 4 px between 512 and
1024) before pooling; from fp32 maps the boxes stay fp32, which is what Detectron2's heads compute
when given fp32 maps (tests/test_roi_heads.py). Measured in docs/benchmarks.md.
"""

from __future__ import annotations

import torch
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads
from torch import Tensor

__all__ = ["ContiguousFeatureCascadeROIHeads", "ContiguousFeatureROIHeads", "pooling_layout"]


def pooling_layout(x: Tensor) -> Tensor:
    """`x` as `roi_align` reads it: contiguous, and fp32 under autocast (as torchvision casts)."""
    dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
    return x.to(dtype=dtype, memory_format=torch.contiguous_format)


class _PoolFromContiguousFeatures:
    """Mixin for a Detectron2 RoI heads class: lay out the pooled levels once, then its forward."""

    def forward(self, images, features: dict[str, Tensor], proposals, targets=None):
        pooled = set(self.box_in_features) | set(getattr(self, "mask_in_features", None) or ())
        pooled |= set(getattr(self, "keypoint_in_features", None) or ())
        features = {k: pooling_layout(v) if k in pooled else v for k, v in features.items()}
        return super().forward(images, features, proposals, targets)


class ContiguousFeatureROIHeads(_PoolFromContiguousFeatures, StandardROIHeads):
    """Detectron2's `StandardROIHeads`; the pooled FPN levels are laid out once per forward."""


class ContiguousFeatureCascadeROIHeads(_PoolFromContiguousFeatures, CascadeROIHeads):
    """Detectron2's `CascadeROIHeads`; the pooled FPN levels are laid out once per forward."""
