"""FastCOCOEvaluator gives pycocotools' numbers, by faster-coco-eval or by pycocotools itself."""

import logging
import sys
from pathlib import Path

import numpy as np
import pycocotools.cocoeval
import pytest
import torch
from conftest import load_script
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from hiera_det.engine.evaluation import FastCOCOEvaluator

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


def _run(evaluator, name, detections, monkeypatch):
    """Evaluate; returns ``(results, {task: (COCOeval class, stats)})``."""
    seen = {}
    derive = COCOEvaluator._derive_coco_results

    def spy(self, coco_eval, iou_type, class_names=None):
        seen[iou_type] = (type(coco_eval), np.asarray(coco_eval.stats[:12]))
        return derive(self, coco_eval, iou_type, class_names)

    monkeypatch.setattr(COCOEvaluator, "_derive_coco_results", spy)
    evaluator.reset()
    for inputs, outputs in _model_outputs(name, detections):
        evaluator.process([inputs], [outputs])
    return evaluator.evaluate(), seen


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
    # The swap is scoped to the evaluation: Detectron2's own evaluator is left as it was.
    from detectron2.evaluation import coco_evaluation

    assert coco_evaluation.COCOeval_opt is not faster_coco_eval.COCOeval_faster


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
