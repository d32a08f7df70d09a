"""ViTDet's simple feature pyramid, with the padding contract Detectron2's version gets wrong.

Detectron2's `SimpleFeaturePyramid` (``modeling/backbone/vit.py``, upstream a59f056) builds p2-p6
from one feature map of its `net`, but its ``padding_constraints`` returns the misspelled key
``"size_divisiblity"`` and it inherits ``size_divisibility = 0`` from `Backbone`. `ImageList`
therefore never rounds the batch up to the pyramid's stride. With ``square_pad`` (ViTDet's 1024
square) every image is padded to the square and nothing goes wrong; without it the batch keeps its
raw size: a `Hiera` net refuses the input (it needs multiples of 32) and a ViT's patch conv
silently drops the pixels past the last multiple of 16. `SimpleFeaturePyramid` here is the same
module with both properties answered from the architecture: the pyramid's coarsest stride,
rounded up to a multiple of what `net` itself needs.
"""

from __future__ import annotations

import math

from detectron2.modeling.backbone.vit import SimpleFeaturePyramid as _D2SimpleFeaturePyramid

__all__ = ["SimpleFeaturePyramid"]


class SimpleFeaturePyramid(_D2SimpleFeaturePyramid):
    """Detectron2's `SimpleFeaturePyramid` (same arguments, parameters and outputs) whose
    `size_divisibility` and `padding_constraints` are what `ImageList.from_tensors` reads.

    Args: as Detectron2's: ``net`` (a `Backbone`), ``in_feature`` (the one map of ``net`` the
    pyramid is built from, e.g. Hiera's "res4" at stride 16), ``out_channels``, ``scale_factors``
    relative to ``in_feature`` ((4, 2, 1, 0.5) gives strides 4-32 from stride 16), ``top_block``,
    ``norm``, ``square_pad``.
    """

    @property
    def size_divisibility(self) -> int:
        # The coarsest pyramid level (before the top block, which pools with ceil) and the net.
        return math.lcm(self._size_divisibility, max(self.net.size_divisibility, 1))

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {"size_divisibility": self.size_divisibility, "square_size": self._square_pad}
