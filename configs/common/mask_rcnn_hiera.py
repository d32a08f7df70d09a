"""Mask R-CNN with a Hiera backbone and an FPN: the detector of the paper (Sec. 5, App. A.2).

Everything is Detectron2's stock Mask R-CNN (`common/models/mask_rcnn_fpn.py`) except the backbone
and the "ViTDet heads": LayerNorm after every hidden conv of the FPN, the RPN (2 convs) and the RoI
heads (box: 4 convs + 1 fc; mask: 4 convs + deconv). The RoI heads are Detectron2's
`StandardROIHeads` as `ContiguousFeatureROIHeads`, which copies the pooled FPN levels into
RoIAlign's layout once per image batch instead of once per pooler (same results).
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from hiera_det.modeling import ConvNormRPNHead, build_hiera, channel_layer_norm
from hiera_det.modeling.roi_heads import ContiguousFeatureROIHeads

from .recipes import DETECTION

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model

# Hiera was pretrained on RGB images normalised with the ImageNet statistics.
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"

model.backbone.bottom_up = L(build_hiera)(
    size="base",
    drop_path_rate=DETECTION["base"]["drop_path_rate"],  # the size configs set it (recipes.py)
    out_features=["res2", "res3", "res4", "res5"],
    # Attention layout at 1024 px (measured in docs/detection.md): stages 1-2 keep mask unit
    # attention; stage 3 attends within 8x8 mask units (256 px windows tile the 1024 square with
    # no padding) except 4 global blocks spread over it (ViTDet's rule; `build_hiera` derives
    # their indices from the size, e.g. B: 8, 12, 16, 20); stage 4 stays global (32x32 tokens).
    # Fully global stages 3-4 would cost 0.14T (B) / 0.57T (L) more FLOPs.
    stage_windows=[1, 1, 8, 0],
    num_global_blocks=4,
    use_sdpa=True,
)
# "LN" everywhere below: Detectron2's channels-first LayerNorm, computed by one fused op
# (`hiera_det.modeling.norm`: same function and parameters, 1.5x faster detector under bf16 on CPU).
model.backbone.norm = L(channel_layer_norm)()
model.backbone.square_pad = 1024  # LSJ crops are 1024 squares; test images are resized into one

# The RPN and RoI heads read the pyramid, so their input width is the pyramid's (256): set
# `model.backbone.out_channels` alone to change it.
FPN_WIDTH = "${model.backbone.out_channels}"
model.proposal_generator.head = L(ConvNormRPNHead)(
    in_channels=FPN_WIDTH, num_anchors=3, conv_dims=[-1, -1], conv_norm=L(channel_layer_norm)()
)
model.roi_heads._target_ = ContiguousFeatureROIHeads
model.roi_heads.box_head.input_shape.channels = FPN_WIDTH
model.roi_heads.mask_head.input_shape.channels = FPN_WIDTH
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]
model.roi_heads.box_head.conv_norm = L(channel_layer_norm)()
# mask head: conv_dims [256] * 5 (4 convs + the deconv)
model.roi_heads.mask_head.conv_norm = L(channel_layer_norm)()
