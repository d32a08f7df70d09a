#!/usr/bin/env python
"""Compare an exported ONNX detector with the PyTorch one on your own images.

    python tools/compare_onnx.py --config-file output/onnx/config.yaml \\
        --onnx output/onnx/model.onnx --weights output/run1/model_final.pth --input photos/

Runs `hiera_det.export.OnnxPredictor` (ONNX Runtime) and Detectron2's `DefaultPredictor`
(`hiera_det.predictor.predictor_cfg`) on each image and prints, per image: the detection counts,
whether the classes are equal (in order), the largest box and score differences, the smallest mask
IoU (full-size masks; 1 when both are empty) and both latencies. Exits with status 1 if any image
disagrees beyond boxes 0.01 px, scores 1e-4 or a mask IoU below 0.99.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def compare_instances(expected, got) -> dict:
    """Agreement of two `Instances` (PyTorch's, ONNX Runtime's) of one image."""
    result = {"pytorch": len(expected), "onnx": len(got)}
    if len(expected) != len(got):
        return {**result, "agree": False}
    boxes = (expected.pred_boxes.tensor - got.pred_boxes.tensor).abs()
    inter = (expected.pred_masks & got.pred_masks).flatten(1).sum(1).double()
    union = (expected.pred_masks | got.pred_masks).flatten(1).sum(1).double()
    ious = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    result.update(
        classes_equal=bool(torch.equal(expected.pred_classes, got.pred_classes)),
        max_box_diff=float(boxes.max()) if len(boxes) else 0.0,
        max_score_diff=float((expected.scores - got.scores).abs().max()) if len(got) else 0.0,
        min_mask_iou=float(ious.min()) if len(ious) else 1.0,
    )
    result["agree"] = (
        result["classes_equal"]
        and result["max_box_diff"] <= 0.01
        and result["max_score_diff"] <= 1e-4
        and result["min_mask_iou"] >= 0.99
    )
    return result


def main(argv: Sequence[str] | None = None) -> list[dict]:
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor

    from hiera_det.export import OnnxPredictor
    from hiera_det.predictor import predictor_cfg

    demo = _demo()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--onnx", required=True, help="model.onnx from tools/export_model.py")
    parser.add_argument("--weights", required=True, help="the checkpoint it was exported from")
    parser.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)

    onnx_predictor = OnnxPredictor(args.config_file, args.onnx, args.opts)
    torch_predictor = DefaultPredictor(predictor_cfg(args.config_file, args.weights, args.opts))
    results = []
    for path, _ in demo.find_images(args.input):
        image = read_image(str(path), format="BGR")
        start = time.perf_counter()
        expected = torch_predictor(image)["instances"]
        torch_s = time.perf_counter() - start
        start = time.perf_counter()
        got = onnx_predictor(image)["instances"]
        onnx_s = time.perf_counter() - start
        result = {"image": str(path), "size": image.shape[:2], **compare_instances(expected, got)}
        result.update(pytorch_s=round(torch_s, 3), onnx_s=round(onnx_s, 3))
        print(result, flush=True)
        results.append(result)
    return results


def _demo():
    """demo.py (for `find_images`: the same files and folders the demo accepts)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    if not all(r["agree"] for r in main()):
        print("compare_onnx.py: error: ONNX Runtime and PyTorch disagree", file=sys.stderr)
        sys.exit(1)
