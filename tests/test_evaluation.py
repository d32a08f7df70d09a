"""FastCOCOEvaluator gives pycocotools' numbers, by faster-coco-eval or by pycocotools itself.

Known AP: COCO box AP through the evaluator our configs build, on hand-made predictions of known AP.

The evaluator is instantiated from ``configs/mask_rcnn_hiera_t.py`` exactly as train_net.py does
(`load_config` + `apply_dataset_config` + `instantiate(cfg.dataloader.evaluator)`: Detectron2's
`FastCOCOEvaluator`). The predictions are built so that every detection either equals a ground-truth
box (IoU 1: a true positive at every IoU threshold), lies far from every box (IoU 0: a false
positive) or lies inside a crowd region (ignored). The expected AP is then computed in this file
from those labels alone, with COCO's definition (per image and class the `max_dets` best-scored
detections, crowd matches ignored, precision made monotone, sampled at 101 recall points, mean
over the classes that have ground truth), not by pycocotools.

The data make the detection limits matter: image 2 has 120 detections of class "a" with true
positives ranked beyond 10 and beyond 100; class "c" has detections but no ground truth.
"""

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pycocotools.cocoeval
import pytest
import torch
from conftest import load_script
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from hiera_det.config_check import load_config
from hiera_det.data.datasets import (
    apply_dataset_config,
    register_coco_format,
)
from hiera_det.engine.evaluation import FastCOCOEvaluator, ImageSubsetEvaluator

ROOT = Path(__file__).resolve().parents[1]
bench = load_script("tools/benchmark_coco_eval.py", "benchmark_coco_eval")
faster_coco_eval = pytest.importorskip("faster_coco_eval")  # a dependency: present in the venv


@pytest.fixture(scope="module")
def synthetic_case(tmp_path_factory):
    """A COCO json (48 synthetic 256 px images, polygons, crowds) and ~400 detections."""
    root = tmp_path_factory.mktemp("coco_eval_case")
    json_file = bench.write_ground_truth(root, num_images=48, image_size=256, seed=0)
    return json_file, bench.make_detections(json_file, seed=0)


def test_the_case_has_what_it_claims(synthetic_case):
    json_file, detections = synthetic_case
    from pycocotools.coco import COCO

    coco = COCO(str(json_file))
    anns = list(coco.anns.values())
    assert len(detections) >= 300
    assert len({d["category_id"] for d in detections}) == len(coco.getCatIds()) == 5
    assert sum(isinstance(a["segmentation"], list) for a in anns) >= 50  # polygons
    crowds = [a for a in anns if a["iscrowd"]]
    regions = [a for a in crowds if isinstance(a["segmentation"]["counts"], list)]
    assert len(regions) >= 5  # uncompressed-RLE rectangles: their pixels fill their boxes
    assert all(a["area"] == a["bbox"][2] * a["bbox"][3] > 0 for a in regions)
    assert sum(isinstance(a["segmentation"]["counts"], str) for a in crowds) >= 5  # instances
    areas = np.array([a["area"] for a in anns if not a["iscrowd"]])
    assert (areas < 32**2).any() and (areas > 96**2).any()  # every COCO area range is populated


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_faster_coco_eval_gives_pycocotools_stats(synthetic_case, iou_type):
    json_file, detections = synthetic_case
    official, _ = bench.evaluate(json_file, detections, iou_type, pycocotools.cocoeval.COCOeval)
    fast, _ = bench.evaluate(json_file, detections, iou_type, faster_coco_eval.COCOeval_faster)
    # An imperfect detector on every area range: each of the 12 numbers is defined and informative.
    assert ((official > 0.05) & (official < 0.99)).all(), official
    np.testing.assert_allclose(fast, official, rtol=0, atol=1e-4)


def _register(name: str, json_file: str, image_root: str = "") -> None:
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), image_root)
    DatasetCatalog.get(name)  # sets thing_dataset_id_to_contiguous_id, as the test loader does


def _model_outputs(name: str, detections: list[dict]):
    """`detections` (COCO results) as Detectron2 model inputs/outputs, image by image."""
    metadata = MetadataCatalog.get(name)
    to_contiguous = metadata.thing_dataset_id_to_contiguous_id
    import pycocotools.mask as mask_util

    for record in DatasetCatalog.get(name):
        h, w = record["height"], record["width"]
        mine = [d for d in detections if d["image_id"] == record["image_id"]]
        boxes = BoxMode.convert(
            torch.tensor([d["bbox"] for d in mine]).reshape(-1, 4),
            BoxMode.XYWH_ABS,
            BoxMode.XYXY_ABS,
        )
        masks = [mask_util.decode(d["segmentation"]) for d in mine]
        instances = Instances(
            (h, w),
            pred_boxes=Boxes(boxes),
            scores=torch.tensor([d["score"] for d in mine]),
            pred_classes=torch.tensor([to_contiguous[d["category_id"]] for d in mine]),
            pred_masks=torch.from_numpy(np.stack(masks)).bool()
            if masks
            else torch.zeros(0, h, w, dtype=torch.bool),
        )
        yield {"image_id": record["image_id"]}, {"instances": instances}


def _run(evaluator, name, detections, monkeypatch, img_ids=None):
    """Evaluate on `img_ids` (default: all); returns ``(results, {task: (class, stats)})``."""
    seen = {}
    derive = COCOEvaluator._derive_coco_results

    def spy(self, coco_eval, iou_type, class_names=None):
        seen[iou_type] = (type(coco_eval), np.asarray(coco_eval.stats[:12]))
        return derive(self, coco_eval, iou_type, class_names)

    monkeypatch.setattr(COCOEvaluator, "_derive_coco_results", spy)
    evaluator.reset()
    for inputs, outputs in _model_outputs(name, detections):
        evaluator.process([inputs], [outputs])
    return evaluator.evaluate(img_ids=img_ids), seen


def _assert_same(results, seen, official_results, official_seen):
    assert set(results) == set(official_results) == {"bbox", "segm"}
    for task in results:
        assert results[task].keys() == official_results[task].keys()  # per-category APs too
        for key, value in official_results[task].items():
            assert results[task][key] == pytest.approx(value, abs=1e-2, nan_ok=True), (task, key)
        np.testing.assert_allclose(seen[task][1], official_seen[task][1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("max_dets", [None, 300])
def test_evaluator_on_tiny_coco_matches_pycocotools(tiny_coco, monkeypatch, caplog, max_dets):
    name = "tiny_coco_evaluation"
    _register(name, tiny_coco.json_file, tiny_coco.image_root)
    detections = bench.make_detections(tiny_coco.json_file, seed=1)
    kwargs = {"distributed": False, "max_dets_per_image": max_dets}
    official = COCOEvaluator(name, use_fast_impl=False, **kwargs)
    official_results, official_seen = _run(official, name, detections, monkeypatch)

    evaluator = FastCOCOEvaluator(name, **kwargs)
    with caplog.at_level(logging.INFO, logger="detectron2"):
        results, seen = _run(evaluator, name, detections, monkeypatch)
    assert {cls for cls, _ in seen.values()} == {faster_coco_eval.COCOeval_faster}
    assert f"by faster-coco-eval {faster_coco_eval.__version__}" in caplog.text
    _assert_same(results, seen, official_results, official_seen)
    # The class is chosen by our evaluator alone: Detectron2's own evaluator is left as it was.
    from detectron2.evaluation import coco_evaluation

    assert coco_evaluation.COCOeval_opt is not faster_coco_eval.COCOeval_faster


@pytest.mark.parametrize("img_ids", [None, [1, 3]])
@pytest.mark.parametrize("use_fast_impl", [False, True])
def test_evaluator_is_detectron2s_results_and_json(
    tiny_coco, tmp_path, monkeypatch, use_fast_impl, img_ids
):
    name = "tiny_coco_evaluation"
    _register(name, tiny_coco.json_file, tiny_coco.image_root)
    detections = bench.make_detections(tiny_coco.json_file, seed=1)
    kwargs = {"distributed": False, "use_fast_impl": False}
    official = COCOEvaluator(name, output_dir=str(tmp_path / "official"), **kwargs)
    official_results, official_seen = _run(official, name, detections, monkeypatch, img_ids)
    kwargs["use_fast_impl"] = use_fast_impl
    evaluator = FastCOCOEvaluator(name, output_dir=str(tmp_path / "ours"), **kwargs)
    results, seen = _run(evaluator, name, detections, monkeypatch, img_ids)
    # The same results file: category ids mapped back to the dataset's (1, 2), same order.
    written = (tmp_path / "ours/coco_instances_results.json").read_text()
    assert written == (tmp_path / "official/coco_instances_results.json").read_text()
    assert {d["category_id"] for d in json.loads(written)} == {1, 2}
    if use_fast_impl:
        assert {cls for cls, _ in seen.values()} == {faster_coco_eval.COCOeval_faster}
        _assert_same(results, seen, official_results, official_seen)
    else:  # Detectron2's own evaluation: the very same numbers
        np.testing.assert_equal(results, official_results)


def test_evaluator_falls_back_to_pycocotools(synthetic_case, monkeypatch, caplog):
    json_file, detections = synthetic_case
    name = "synthetic_case_evaluation"
    _register(name, json_file)
    official_results, official_seen = _run(
        COCOEvaluator(name, distributed=False, use_fast_impl=False), name, detections, monkeypatch
    )
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now raises ImportError
    evaluator = FastCOCOEvaluator(name, distributed=False)
    assert evaluator.implementation.startswith("pycocotools ")
    with caplog.at_level(logging.INFO, logger="detectron2"):
        results, seen = _run(evaluator, name, detections, monkeypatch)
    assert {cls for cls, _ in seen.values()} == {pycocotools.cocoeval.COCOeval}
    assert "by pycocotools" in caplog.text
    _assert_same(results, seen, official_results, official_seen)


def test_use_fast_impl_false_is_pycocotools(tiny_coco):
    name = "tiny_coco_evaluation"
    _register(name, tiny_coco.json_file, tiny_coco.image_root)
    assert FastCOCOEvaluator(name, use_fast_impl=False).implementation.startswith("pycocotools ")
    assert FastCOCOEvaluator(name).implementation.startswith("faster-coco-eval ")


@pytest.mark.parametrize(
    "config",
    [
        "configs/quickstart.py",
        "configs/mask_rcnn_hiera_b.py",
        "projects/ViTDet-Hiera/configs/COCO/cascade_mask_rcnn_hiera_b.py",
        "projects/ViTDet-Hiera/configs/COCO/mask_rcnn_swin_b.py",
    ],
)
def test_coco_configs_use_fast_evaluator(config):
    cfg = LazyConfig.load(str(ROOT / config))
    assert cfg.dataloader.evaluator._target_ is FastCOCOEvaluator


CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]


SIDE = 100  # every box is 100x100 px: "large" in COCO's area ranges (> 96**2)


IMAGE_SIZE = 2000


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


def test_subset_evaluator_scores_only_its_images(tiny_coco, tmp_path):
    """Perfect predictions for 2 of the 4 images: pycocotools' AP is 100 on those 2 images, and
    lower on all 4 (the other images' objects count as missed), as COCOEvaluator computes it."""
    register_coco_format("eval_images_ap", tiny_coco.json_file, tiny_coco.image_root)
    dicts = DatasetCatalog.get("eval_images_ap")
    to_contiguous = MetadataCatalog.get("eval_images_ap").thing_dataset_id_to_contiguous_id
    kept = dicts[:2]

    def run(evaluator) -> float:
        evaluator.reset()
        for d in kept:
            instances = Instances((d["height"], d["width"]))
            boxes = [
                BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in d["annotations"]
            ]
            instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
            instances.scores = torch.ones(len(boxes))
            instances.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
            evaluator.process([{"image_id": d["image_id"]}], [{"instances": instances}])
        return evaluator.evaluate()["bbox"]["AP"]

    def coco_evaluator():
        return COCOEvaluator("eval_images_ap", tasks=("bbox",), output_dir=str(tmp_path))

    assert to_contiguous  # the dicts' category ids are contiguous ones, as predictions'
    whole = run(coco_evaluator())
    subset = run(ImageSubsetEvaluator(coco_evaluator(), [d["image_id"] for d in kept], "note"))
    assert subset == pytest.approx(100.0) and whole < 90.0
