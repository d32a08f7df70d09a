"""COCO box AP through the evaluator our configs build, on hand-made predictions of known AP.

The evaluator is instantiated from ``configs/mask_rcnn_hiera_t.py`` exactly as train_net.py does
(`load_config` + `apply_dataset_config` + `instantiate(cfg.dataloader.evaluator)`: Detectron2's
`COCOEvaluator`). The predictions are built so that every detection either equals a ground-truth
box (IoU 1: a true positive at every IoU threshold), lies far from every box (IoU 0: a false
positive) or lies inside a crowd region (ignored). The expected AP is then computed in this file
from those labels alone, with COCO's definition (per image and class the `max_dets` best-scored
detections, crowd matches ignored, precision made monotone, sampled at 101 recall points, mean
over the classes that have ground truth), not by pycocotools.

The data make the detection limits matter: image 2 has 120 detections of class "a" with true
positives ranked beyond 10 and beyond 100; class "c" has detections but no ground truth.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import instantiate
from detectron2.structures import Boxes, Instances

from hiera_det.config_check import load_config
from hiera_det.data.datasets import apply_dataset_config

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
SIDE = 100  # every box is 100x100 px: "large" in COCO's area ranges (> 96**2)
IMAGE_SIZE = 2000
# Image 2, class "a": 120 detections; these ranks (by score, 0 = best) are the true positives.
MANY_TP_RANKS = [2, 5, 8, 11, 14, 20, 30, 40, 50, 60, 70, 90, 99, 105, 115]


def box(col: int, row: int) -> list[float]:
    """XYXY of the 100x100 cell (col, row) of a 150 px grid: cells never overlap."""
    return [150.0 * col, 150.0 * row, 150.0 * col + SIDE, 150.0 * row + SIDE]


def build_case():
    """Ground truth (COCO json dict) and predictions ``[(image_id, class_id, xyxy, score, kind)]``
    with kind in {"tp", "fp", "crowd"}."""
    annotations, detections = [], []

    def gt(image_id, category, xyxy, crowd=0):
        x0, y0, x1, y1 = xyxy
        annotations.append({
            "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": crowd,
        })  # fmt: skip

    # Image 1: class a has 3 boxes (one never detected) and a crowd region; class b has 1 box.
    for col in range(3):
        gt(1, 1, box(col, 0))
    gt(1, 1, [0.0, 600.0, 450.0, 1050.0], crowd=1)
    gt(1, 2, box(0, 2))
    detections += [
        (1, 1, box(0, 0), 0.93, "tp"),
        (1, 1, box(8, 8), 0.91, "fp"),
        (1, 1, [50.0, 650.0, 150.0, 750.0], 0.89, "crowd"),  # inside the crowd region
        (1, 1, box(1, 0), 0.42, "tp"),
        (1, 2, box(9, 9), 0.95, "fp"),
        (1, 2, box(0, 2), 0.6, "tp"),
        (1, 3, box(5, 5), 0.7, "fp"),  # class c has no ground truth anywhere
    ]
    # Image 2: 15 boxes of class a in rows 0-1; 120 detections, the misses in rows 5-12.
    for i in range(len(MANY_TP_RANKS)):
        gt(2, 1, box(i % 10, i // 10))
    tps = iter(range(len(MANY_TP_RANKS)))
    fps = iter(range(200))
    for rank in range(120):
        score = 0.9 - 0.007 * rank + 0.0001  # distinct from every score of image 1
        if rank in MANY_TP_RANKS:
            i = next(tps)
            detections.append((2, 1, box(i % 10, i // 10), score, "tp"))
        else:
            j = next(fps)
            detections.append((2, 1, box(j % 12, 5 + j // 12), score, "fp"))
    # Image 3: one box of class b, detected once with a low score; a false positive of class a.
    gt(3, 2, box(4, 4))
    detections += [(3, 2, box(4, 4), 0.3, "tp"), (3, 1, box(9, 9), 0.88, "fp")]

    images = [
        {"id": i, "file_name": f"{i}.jpg", "height": IMAGE_SIZE, "width": IMAGE_SIZE}
        for i in (1, 2, 3)
    ]
    coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    return coco, detections


def expected_ap(coco: dict, detections: list, max_dets: int) -> dict[int, float]:
    """COCO AP (in %) per category id, from the detections' labels; nan without ground truth."""
    result = {}
    for category in (c["id"] for c in CATEGORIES):
        num_gt = sum(a["category_id"] == category and not a["iscrowd"] for a in coco["annotations"])
        kept = []
        for image in coco["images"]:
            mine = [d for d in detections if d[0] == image["id"] and d[1] == category]
            kept += sorted(mine, key=lambda d: -d[3])[:max_dets]
        kept = [d for d in sorted(kept, key=lambda d: -d[3]) if d[4] != "crowd"]
        if num_gt == 0:
            result[category] = math.nan
            continue
        tp = np.cumsum([d[4] == "tp" for d in kept])
        fp = np.cumsum([d[4] == "fp" for d in kept])
        recall, precision = tp / num_gt, tp / np.maximum(tp + fp, 1)
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at >= recall
        sampled = []
        for r in np.linspace(0, 1, 101):
            reached = np.nonzero(recall >= r - 1e-12)[0]
            sampled.append(precision[reached[0]] if len(reached) else 0.0)
        result[category] = 100 * float(np.mean(sampled))
    return result


@pytest.fixture(scope="module")
def bbox_results(tmp_path_factory) -> dict[str, float]:
    root = tmp_path_factory.mktemp("known_ap")
    coco, detections = build_case()
    (root / "images").mkdir()
    (root / "gt.json").write_text(json.dumps(coco))
    cfg = load_config(
        str(ROOT / "configs/mask_rcnn_hiera_t.py"),
        [f"dataset.test=[known_ap_test,{root / 'gt.json'},{root / 'images'}]"],
    )
    apply_dataset_config(cfg)
    from detectron2.data import DatasetCatalog

    DatasetCatalog.get("known_ap_test")  # sets the category id mapping, as the test loader does
    evaluator = instantiate(cfg.dataloader.evaluator)
    evaluator.reset()
    contiguous = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    for image in coco["images"]:
        mine = [d for d in detections if d[0] == image["id"]]
        instances = Instances((IMAGE_SIZE, IMAGE_SIZE))
        instances.pred_boxes = Boxes(torch.tensor([d[2] for d in mine]))
        instances.scores = torch.tensor([d[3] for d in mine])
        instances.pred_classes = torch.tensor([contiguous[d[1]] for d in mine])
        evaluator.process([{"image_id": image["id"]}], [{"instances": instances}])
    return evaluator.evaluate()["bbox"]


def test_the_case_makes_the_detection_limits_matter():
    coco, detections = build_case()
    at = {m: expected_ap(coco, detections, m) for m in (10, 100, 1000)}
    assert at[10][1] < at[100][1] < at[1000][1]  # class a: true positives past ranks 10 and 100
    assert math.isnan(at[100][3])


def test_known_predictions_give_the_independently_computed_ap(bbox_results):
    coco, detections = build_case()
    expected = expected_ap(coco, detections, max_dets=100)
    for category in CATEGORIES:
        got, want = bbox_results[f"AP-{category['name']}"], expected[category["id"]]
        if math.isnan(want):
            assert math.isnan(got), category  # no ground truth: no AP, and not in the mean
        else:
            assert got == pytest.approx(want, abs=1e-6), category
    mean = np.nanmean(list(expected.values()))
    # Every match has IoU 1 or 0 (or is a crowd match), so AP50 = AP75 = AP; all boxes are large.
    for key in ("AP", "AP50", "AP75", "APl"):
        assert bbox_results[key] == pytest.approx(mean, abs=1e-6), key
    assert math.isnan(bbox_results["APs"]) and math.isnan(bbox_results["APm"])
