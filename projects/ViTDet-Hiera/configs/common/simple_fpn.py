"""ViTDet's neck for Hiera: a simple feature pyramid built from Hiera's stage 3 alone.

ViTDet builds p2-p6 from the single stride-16 map of a plain ViT: deconvolutions up to strides 8
and 4, a max-pool down to 32 and LastLevelMaxPool for 64. The paper (Appendix B) recommends this
family for Hiera; `to_simple_feature_pyramid(model)` replaces the FPN over Hiera's four stages by
that pyramid over stage 3 ("res4", stride 16), the stage that holds most of Hiera's depth. Stage 4
is then not built at all (`Hiera` builds stages up to its last output), so its pretrained weights
are reported as unused when loading. Everything else in the model config is left as it is.
"""

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from omegaconf import OmegaConf

from hiera_det.modeling.simple_fpn import SimpleFeaturePyramid

IN_FEATURE = "res4"  # stride 16: ViT's stride, the only one ViTDet's scale factors are made for
SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5)  # strides 4, 8, 16, 32 from stride 16; p6 by the top block


def to_simple_feature_pyramid(model, train=None):
    """Replace ``model.backbone`` (an `FPN` over a Hiera ``bottom_up``) by a `SimpleFeaturePyramid`
    over that Hiera's stage 3, keeping the FPN's width, norm and square padding. Settings of
    `train` that interpolate the Hiera's arguments (``train.init_checkpoint`` follows its size)
    are pointed at its new place, ``model.backbone.net``. In place; returns `model`."""
    fpn = model.backbone
    net = fpn.bottom_up
    net.out_features = [IN_FEATURE]
    model.backbone = L(SimpleFeaturePyramid)(
        net=net,
        in_feature=IN_FEATURE,
        out_channels=fpn.out_channels,
        scale_factors=SCALE_FACTORS,
        top_block=L(LastLevelMaxPool)(),
        norm=fpn.norm,
        square_pad=fpn.square_pad,
    )
    if train is not None:
        for key, value in OmegaConf.to_container(train, resolve=False).items():
            if isinstance(value, str) and "${model.backbone.bottom_up." in value:
                train[key] = value.replace("${model.backbone.bottom_up.", "${model.backbone.net.")
    return model
