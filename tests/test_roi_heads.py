"""`ContiguousFeatureROIHeads` computes what Detectron2's `StandardROIHeads` computes, and its
poolers get maps that `roi_align` need not copy."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, shrink_overrides
from detectron2.config import instantiate
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.utils.events import EventStorage

from hiera_det.config_check import load_config
from hiera_det.modeling.roi_heads import ContiguousFeatureROIHeads, pooling_layout

CONFIG = str(ROOT / "configs/mask_rcnn_hiera_t.py")


def _detectors():
    cfg = load_config(CONFIG, shrink_overrides(128))
    assert cfg.model.roi_heads._target_ is ContiguousFeatureROIHeads
    torch.manual_seed(0)
    ours = instantiate(cfg.model)
    cfg.model.roi_heads._target_ = StandardROIHeads
    stock = instantiate(cfg.model)
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def _inputs(with_targets: bool = False):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    item = {"image": torch.rand(3, 128, 128, generator=g) * 255, "height": 128, "width": 128}
    if with_targets:
        inst = Instances((128, 128))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 70.0, 90.0], [40.0, 30.0, 120.0, 100.0]]))
        inst.gt_classes = torch.tensor([0, 1])
        from detectron2.structures import BitMasks

        masks = torch.zeros(2, 128, 128, dtype=torch.bool)
        masks[0, 12:90, 10:70] = masks[1, 30:100, 40:120] = True
        inst.gt_masks = BitMasks(masks)
        item["instances"] = inst
    return [item]


def _infer(model, features_to_fp32: bool = False):
    """One image's detections (all 100: score threshold 0) under bf16 autocast or in fp32."""
    model.eval().roi_heads.box_predictor.test_score_thresh = 0.0
    if features_to_fp32:  # Detectron2's heads, handed the FPN maps in fp32
        forward = model.roi_heads.forward

        def fp32_maps(images, features, proposals, targets=None):
            return forward(images, {k: v.float() for k, v in features.items()}, proposals, targets)

        model.roi_heads.forward = fp32_maps
    return model(_inputs())[0]["instances"]


def _assert_same(got, want):
    assert len(want) > 0
    for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        a, b = got.get(field), want.get(field)
        a, b = (a.tensor, b.tensor) if field == "pred_boxes" else (a, b)
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=field)


def test_fp32_inference_equals_detectron2s_heads_bit_for_bit():
    ours, stock = _detectors()
    with torch.no_grad():
        _assert_same(_infer(ours), _infer(stock))


def test_bf16_inference_equals_detectron2s_heads_on_fp32_maps():
    """Under autocast ours pools exact (fp32) boxes: what Detectron2's heads do from fp32 maps."""
    ours, stock = _detectors()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_same(_infer(ours), _infer(stock, features_to_fp32=True))


def test_detectron2s_roialign_rounds_boxes_to_the_maps_dtype():
    """Why bf16 results differ from Detectron2's heads on bf16 maps: its `ROIAlign` casts the
    boxes to bf16: a box from x = 701 px is pooled from x = 700 px; from fp32 maps it is exact."""
    from detectron2.layers import ROIAlign

    pool = ROIAlign((7, 7), spatial_scale=1 / 4, sampling_ratio=0, aligned=True)
    maps = torch.arange(256.0).repeat(1, 1, 256, 1)  # value = x of the column at stride 4
    rois = torch.tensor([[0.0, 701.0, 10.0, 901.0, 50.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = pool(pooling_layout(maps.bfloat16()), rois)
        rounded = pool(maps.bfloat16(), rois)
    assert rois[0, 1].bfloat16().item() == 700.0  # bf16 between 512 and 1024: multiples of 4
    assert exact.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    # column centres (x / 4 - 0.5 with aligned=True) averaged over the first bin: 701..729.7 px
    assert exact[0, 0, 0, 0].item() == pytest.approx((701 + (901 - 701) / 14) / 4 - 0.5, abs=0.01)
    assert abs(rounded[0, 0, 0, 0].float().item() - exact[0, 0, 0, 0].item()) > 0.2


def test_training_losses_and_gradients_equal_detectron2s_heads():
    ours, stock = _detectors()
    losses = []
    for model in (ours, stock):
        torch.manual_seed(1)  # the RoI heads sample proposals at random
        with EventStorage(0):
            loss = model.train()(_inputs(with_targets=True))
        sum(loss.values()).backward()
        losses.append(loss)
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        torch.testing.assert_close(losses[0][key], losses[1][key], rtol=0, atol=0, msg=key)
    for (name, p), q in zip(ours.named_parameters(), stock.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_poolers_get_contiguous_maps_fp32_under_autocast():
    ours, _ = _detectors()
    seen = []
    for pooler in (ours.roi_heads.box_pooler, ours.roi_heads.mask_pooler):
        forward = pooler.forward

        def spy(x, boxes, forward=forward):
            seen.extend((t.is_contiguous(), t.dtype) for t in x)
            return forward(x, boxes)

        pooler.forward = spy
    ours.eval().roi_heads.box_predictor.test_score_thresh = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours(_inputs())
    levels = len(ours.roi_heads.box_in_features)
    assert seen == [(True, torch.float32)] * (2 * levels)


def test_pooling_layout_copies_only_what_roi_align_would():
    nhwc = torch.randn(1, 8, 4, 4).to(memory_format=torch.channels_last)
    assert pooling_layout(nhwc).is_contiguous() and pooling_layout(nhwc).dtype == torch.float32
    plain = torch.randn(1, 8, 4, 4, dtype=torch.bfloat16)
    assert pooling_layout(plain) is plain  # no autocast: the maps' own dtype, nothing copied
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pooling_layout(plain).dtype == torch.float32
