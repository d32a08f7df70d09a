"""Mask R-CNN on SAM 2's image-encoder trunk, initialised from Meta's SAM 2.1 checkpoints.

The paper's detector and recipe (`configs/common/mask_rcnn_hiera_100ep.py`: FPN and conv+LN
heads, LSJ 1024, AdamW, 100 epochs at batch 64) with one change: the backbone is SAM 2's trunk
("HieraDet", `SAM2_HIERA_SIZES`: windowed attention in every stage, SAM 2's global blocks and
position embedding), so that SAM 2.1's Apache-2.0 weights load into it with every tensor matched.
The size configs set `size` (and with it the layout and the weights), drop path and lr.
"""

from detectron2.config import LazyCall as L

from hiera_det.modeling import build_hiera

from ..common.mask_rcnn_hiera_100ep import dataloader, lr_multiplier, model, optimizer, train
from ..common.recipes import DETECTION

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]

model.backbone.bottom_up = L(build_hiera)(
    size="base_plus",
    layout="sam2",  # windows, global blocks and position embedding follow the size
    drop_path_rate=DETECTION["base_plus"]["drop_path_rate"],  # the size configs set it
    out_features=["res2", "res3", "res4", "res5"],
    use_sdpa=True,
)
# Meta's SAM 2.1 files are named after the same sizes (tiny, small, base_plus, large).
train.init_checkpoint = (
    "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
    "sam2.1_hiera_${model.backbone.bottom_up.size}.pt"
)
