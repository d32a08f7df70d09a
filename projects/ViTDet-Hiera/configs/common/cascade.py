"""The one change from Mask R-CNN to ViTDet's Cascade Mask R-CNN, as a function on a model config.

ViTDet pastes the same cascade block into each of its Cascade configs; here a Cascade config is its
Mask R-CNN config plus ``to_cascade(model)``. Each stage copies the Mask R-CNN box head and box
predictor (so the LN 4conv1fc head, the number of classes and any LVIS settings carry over) and
changes only what a cascade stage needs: its IoU threshold, its box regression weights and class-
agnostic regression. The mask head is shared, as in Detectron2's `CascadeROIHeads`.
"""

import copy

from detectron2.config import LazyCall as L
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher

from hiera_det.modeling.roi_heads import ContiguousFeatureCascadeROIHeads

# ViTDet's (and Cai & Vasconcelos') three stages: IoU threshold and (dx, dy, dw, dh) weights.
CASCADE_STAGES = (
    (0.5, (10.0, 10.0, 5.0, 5.0)),
    (0.6, (20.0, 20.0, 10.0, 10.0)),
    (0.7, (30.0, 30.0, 15.0, 15.0)),
)


def to_cascade(model, stages=CASCADE_STAGES):
    """Turn a Mask R-CNN model config's RoI heads into cascade heads (in place): Detectron2's
    `CascadeROIHeads` as `ContiguousFeatureCascadeROIHeads` (see `hiera_det.modeling.roi_heads`).

    Args:
        model: a LazyConfig of a `GeneralizedRCNN` whose ``roi_heads`` has ``box_head``,
            ``box_predictor`` and ``proposal_matcher`` (Detectron2's `mask_rcnn_fpn.py` layout).
        stages: per stage, the foreground IoU threshold and the box regression weights.
    Returns:
        `model`, for chaining.
    """
    heads = model.roi_heads
    box_head = heads.pop("box_head")
    box_predictor = heads.pop("box_predictor")
    heads.pop("proposal_matcher")  # one matcher per stage instead

    predictors = []
    for _, weights in stages:
        predictor = copy.deepcopy(box_predictor)
        predictor.box2box_transform = L(Box2BoxTransform)(weights=weights)
        predictor.cls_agnostic_bbox_reg = True  # every stage refines one box per proposal
        # A list element sits one level deeper than `box_predictor` did.
        predictor.num_classes = "${...num_classes}"
        predictors.append(predictor)
    heads.update(
        _target_=ContiguousFeatureCascadeROIHeads,
        box_heads=[copy.deepcopy(box_head) for _ in stages],
        box_predictors=predictors,
        proposal_matchers=[
            L(Matcher)(thresholds=[iou], labels=[0, 1], allow_low_quality_matches=False)
            for iou, _ in stages
        ],
    )
    return model
