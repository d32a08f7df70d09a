#!/usr/bin/env python
"""Compare an exported ONNX detector with the PyTorch one on your own images.

    python tools/compare_onnx.py --config-file output/onnx/config.yaml \\
        --onnx output/onnx/model.onnx --weights output/run1/model_final.pth --input photos/

Runs `hiera_det.export.OnnxPredictor` (ONNX Runtime) and Detectron2's `DefaultPredictor`
(`hiera_det.predictor.predictor_cfg`) on each image and prints, per image: the detection counts,
how many are the same detection in both (class, box within 0.01 px, score within 1e-4; in any
order, as near-equal scores may come either way), their largest box and score differences, the
smallest mask IoU and most differing mask pixels (full-size masks) and both latencies. Exits with
status 1 if any image has a detection without its match or a mask pair with IoU below 0.99 and
more than 4 differing pixels.
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


# A pasted mask pixel flips where its probability is within rounding of 0.5: on the border. Masks
# agree with IoU >= MASK_IOU, or when at most MASK_PIXELS differ (a thin mask is mostly border).
MASK_IOU, MASK_PIXELS = 0.99, 4


def compare_instances(expected, got) -> dict:
    """Agreement of two `Instances` (PyTorch's, ONNX Runtime's) of one image: the same detections
    (`match_detections`: class, box and score within its tolerances, in any order) and their
    full-size masks within `MASK_IOU` / `MASK_PIXELS`."""
    from hiera_det.export import match_detections

    def arrays(instances) -> dict:
        fields = (instances.pred_boxes.tensor, instances.scores, instances.pred_classes)
        return dict(zip(("boxes", "scores", "classes"), (t.numpy() for t in fields)))

    i, j = (torch.from_numpy(k) for k in match_detections(arrays(expected), arrays(got)))
    result = {"pytorch": len(expected), "onnx": len(got), "matched": len(i)}
    a, b = expected.pred_masks[i].flatten(1), got.pred_masks[j].flatten(1)
    union = (a | b).sum(1).double()
    differing = (a ^ b).sum(1)
    ious = torch.where(union > 0, (a & b).sum(1) / union.clamp(min=1), torch.ones_like(union))
    result.update(
        max_box_diff=_max_abs(expected.pred_boxes.tensor[i] - got.pred_boxes.tensor[j]),
        max_score_diff=_max_abs(expected.scores[i] - got.scores[j]),
        min_mask_iou=float(ious.min()) if len(ious) else 1.0,
        max_mask_pixels_differing=int(differing.max()) if len(differing) else 0,
        masks_agree=bool(((ious >= MASK_IOU) | (differing <= MASK_PIXELS)).all()),
    )
    result["agree"] = len(expected) == len(got) == len(i) and result["masks_agree"]
    return result


def _max_abs(diff: torch.Tensor) -> float:
    return float(diff.abs().max()) if diff.numel() else 0.0


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
