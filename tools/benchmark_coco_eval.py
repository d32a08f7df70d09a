#!/usr/bin/env python
"""Time COCO evaluation by pycocotools and by faster-coco-eval on the same detections.

    python tools/benchmark_coco_eval.py [--images 500] [--image-size 256] [--repeats 3] \\
        [--seed 0] [--output DIR]

The case is made deterministically from `--seed`: the ground truth is the built-in synthetic
shapes' val split (`hiera_det.data.synthetic`, RLE masks) with every third instance rewritten as a
polygon and crowd annotations added (some instances marked crowd, some uncompressed-RLE crowd
regions); the detections are what a detector gets wrong (`make_detections`: jittered boxes, shifted
and dilated/eroded RLE masks, misses, duplicates, wrong classes, false positives, hits on crowd
regions). Each implementation runs Detectron2's own ``_evaluate_predictions_on_coco`` (what
`COCOEvaluator` runs: ``loadRes``, evaluate, accumulate, summarize) on a freshly loaded ground truth
per run; the table gives the median of `--repeats` runs, the speed-up and the largest difference
between the two implementations' 12 ``stats``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util

IOU_TYPES = ("bbox", "segm")


def _encode(mask: np.ndarray) -> dict:
    """A binary ``[H, W]`` mask as compressed RLE with a str ``counts`` (json-able, as Detectron2's
    `instances_to_coco_json` writes it)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (as its crowd annotations): run lengths over the column-major
    pixels, starting with a run of zeros."""
    pixels = mask.astype(np.uint8).flatten(order="F")
    edges = np.flatnonzero(np.diff(pixels)) + 1
    bounds = np.concatenate([[0], edges, [pixels.size]])
    counts = np.diff(bounds).tolist()
    if pixels[0] == 1:  # the first run counts zeros
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def _polygon(mask: np.ndarray) -> list[list[float]]:
    """The outer contours of `mask` as COCO polygons (each at least 3 points)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def _set_geometry(ann: dict, h: int, w: int) -> None:
    """Recompute ``area`` and ``bbox`` from ``segmentation`` (as COCO's own files hold them)."""
    segm = ann["segmentation"]
    if isinstance(segm, list):
        rle = mask_util.merge(mask_util.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_util.frPyObjects(segm, h, w)
    else:
        rle = segm
    ann["area"] = float(mask_util.area(rle))
    ann["bbox"] = [float(v) for v in mask_util.toBbox(rle)]


def write_ground_truth(root: Path, num_images: int, image_size: int, seed: int) -> Path:
    """The synthetic val split of `num_images` images, with polygons and crowds; returns its json.

    Every third instance becomes a polygon (its mask's outer contours), one in twelve is marked
    crowd, and about a third of the images get a crowd region (a rectangle, uncompressed RLE).
    """
    from hiera_det.data.synthetic import SyntheticSpec, ensure_synthetic

    # Wider than the default sizes, so that at 256 px there are small, medium and large objects.
    spec = SyntheticSpec(
        num_train=0,
        num_val=num_images,
        image_size=(image_size, image_size),
        object_size=(0.08, 0.6),
        seed=seed,
    )
    synthetic = ensure_synthetic(spec, root / "synthetic", progress=False)
    coco = json.loads((synthetic / "annotations" / "instances_val.json").read_text())
    rng = np.random.default_rng([seed, 1])
    h = w = image_size
    for i, ann in enumerate(coco["annotations"]):
        if i % 3 == 0:
            ann["segmentation"] = _polygon(mask_util.decode(ann["segmentation"]))
            _set_geometry(ann, h, w)
        elif i % 12 == 1:
            ann["iscrowd"] = 1
    for image in coco["images"]:
        if rng.random() < 0.35:
            x0, y0 = rng.integers(0, w // 2, 2)
            x1, y1 = (x0, y0) + rng.integers(w // 8, w // 2, 2)
            region = np.zeros((h, w), np.uint8)
            region[y0:y1, x0:x1] = 1
            crowd = {
                "id": len(coco["annotations"]) + 1,
                "image_id": image["id"],
                "category_id": int(rng.integers(1, len(coco["categories"]) + 1)),
                "segmentation": _uncompressed_rle(region),
                "iscrowd": 1,
            }
            _set_geometry(crowd, h, w)
            coco["annotations"].append(crowd)
    json_file = root / "instances_with_crowds.json"
    json_file.write_text(json.dumps(coco))
    return json_file


def _perturbed_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`mask` shifted by up to 3 px and, two times in three, dilated or eroded by 1 px."""
    dx, dy = (int(v) for v in rng.integers(-3, 4, 2))
    shift = np.float32([[1, 0, dx], [0, 1, dy]])
    moved = cv2.warpAffine(mask, shift, mask.shape[::-1], flags=cv2.INTER_NEAREST)
    kernel = np.ones((3, 3), np.uint8)
    choice = rng.integers(3)
    if choice == 1:
        moved = cv2.dilate(moved, kernel)
    elif choice == 2 and cv2.erode(moved, kernel).any():
        moved = cv2.erode(moved, kernel)
    return moved


def _jittered_box(box: list[float], rng: np.random.Generator, scale: float) -> list[float]:
    x, y, w, h = box
    x, y = x + rng.normal(0, scale * w), y + rng.normal(0, scale * h)
    w, h = w * np.exp(rng.normal(0, scale)), h * np.exp(rng.normal(0, scale))
    return [float(x), float(y), float(max(w, 1.0)), float(max(h, 1.0))]


def make_detections(json_file: str | Path, seed: int) -> list[dict]:
    """COCO-format results for the ground truth in `json_file`, as an imperfect detector gives.

    Per ground-truth instance: missed (10%), else a detection with a jittered box and a perturbed
    mask (7% with a wrong class), plus a looser, lower-scored duplicate (20%). Per image: a Poisson
    (2.5) number of false positives (random boxes with elliptic masks, low scores) and two
    detections inside each crowd region.
    """
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(json_file))
    rng = np.random.default_rng([seed, 2])
    cat_ids = sorted(coco.getCatIds())
    detections = []

    def add(image_id: int, category_id: int, box: list[float], mask: np.ndarray, score: float):
        detections.append(
            {
                "image_id": image_id,
                "category_id": category_id,
                "bbox": box,
                "score": float(score),
                "segmentation": _encode(mask),
            }
        )

    for image_id in sorted(coco.getImgIds()):
        h, w = coco.imgs[image_id]["height"], coco.imgs[image_id]["width"]
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            segm = ann["segmentation"]
            if ann["iscrowd"] and isinstance(segm, dict) and isinstance(segm["counts"], list):
                x, y, bw, bh = ann["bbox"]
                for _ in range(2):  # detections inside a crowd region: ignored, not false
                    box = _jittered_box([x + bw / 4, y + bh / 4, bw / 2, bh / 2], rng, 0.2)
                    add(
                        image_id,
                        ann["category_id"],
                        box,
                        _ellipse(box, h, w),
                        rng.uniform(0.2, 0.9),
                    )
                continue
            if rng.random() < 0.1:
                continue  # missed
            mask = coco.annToMask(ann)
            category = ann["category_id"]
            if rng.random() < 0.07:
                category = int(rng.choice(cat_ids))
            score = rng.uniform(0.3, 1.0)
            add(
                image_id,
                category,
                _jittered_box(ann["bbox"], rng, 0.07),
                _perturbed_mask(mask, rng),
                score,
            )
            if rng.random() < 0.2:
                looser = _jittered_box(ann["bbox"], rng, 0.2)
                add(
                    image_id,
                    category,
                    looser,
                    _perturbed_mask(mask, rng),
                    score * rng.uniform(0.3, 0.9),
                )
        for _ in range(rng.poisson(2.5)):
            bw, bh = float(rng.uniform(8, w / 2)), float(rng.uniform(8, h / 2))
            box = [float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh)), bw, bh]
            add(
                image_id, int(rng.choice(cat_ids)), box, _ellipse(box, h, w), rng.uniform(0.01, 0.6)
            )
    return detections


def _ellipse(box: list[float], h: int, w: int) -> np.ndarray:
    """A filled ellipse inscribed in the XYWH `box`, as an ``[h, w]`` uint8 mask."""
    x, y, bw, bh = box
    mask = np.zeros((h, w), np.uint8)
    centre = (int(round(x + bw / 2)), int(round(y + bh / 2)))
    axes = (max(int(bw / 2), 1), max(int(bh / 2), 1))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, thickness=-1)
    if not mask.any():
        mask[min(max(centre[1], 0), h - 1), min(max(centre[0], 0), w - 1)] = 1
    return mask


def implementations() -> dict[str, type]:
    """The COCOeval classes to compare: pycocotools' and, where installed, faster-coco-eval's."""
    from pycocotools.cocoeval import COCOeval

    from hiera_det.engine.evaluation import faster_cocoeval_class

    found = {"pycocotools": COCOeval}
    if faster_cocoeval_class() is not None:
        found["faster-coco-eval"] = faster_cocoeval_class()
    return found


def evaluate(json_file: str | Path, detections: list[dict], iou_type: str, cocoeval_fn: type):
    """Detectron2's ``_evaluate_predictions_on_coco`` with `cocoeval_fn` on a freshly loaded
    ground truth (evaluators annotate it in place); returns ``(stats [12], seconds)``, the time
    covering ``loadRes`` through ``summarize``."""
    from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # both print their progress and summary
        coco_gt = COCO(str(json_file))
        start = time.perf_counter()
        # A copy: loadRes adds keys to the dicts it is given.
        results = [dict(d) for d in detections]
        coco_eval = _evaluate_predictions_on_coco(
            coco_gt, results, iou_type, cocoeval_fn=cocoeval_fn
        )
        seconds = time.perf_counter() - start
    return np.asarray(coco_eval.stats[:12], dtype=np.float64), seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="where to write the case (default: a temporary folder)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.output or scratch)
        json_file = write_ground_truth(root, args.images, args.image_size, args.seed)
        detections = make_detections(json_file, args.seed)
        num_gt = len(json.loads(json_file.read_text())["annotations"])
        print(
            f"{args.images} images, {num_gt} ground-truth annotations, {len(detections)} detections"
        )
        found = implementations()
        columns = " | ".join(f"{name} (s)" for name in found)
        print(f"| iou type | {columns} | speed-up | max stats diff |")
        print(f"|---|{'---|' * len(found)}---|---|")
        for iou_type in IOU_TYPES:
            stats, times = {}, {}
            for name, cocoeval_fn in found.items():
                runs = [
                    evaluate(json_file, detections, iou_type, cocoeval_fn)
                    for _ in range(args.repeats)
                ]
                stats[name], times[name] = runs[0][0], statistics.median(t for _, t in runs)
            cells = " | ".join(f"{times[name]:.2f}" for name in found)
            if len(found) == 2:
                speedup = times["pycocotools"] / times["faster-coco-eval"]
                diff = np.abs(stats["pycocotools"] - stats["faster-coco-eval"]).max()
                print(f"| {iou_type} | {cells} | {speedup:.1f}x | {diff:.1e} |")
            else:
                print(f"| {iou_type} | {cells} | (faster-coco-eval not installed) | |")


if __name__ == "__main__":
    main()
