#!/usr/bin/env python
"""Count parameters and FLOPs of a detector config (fvcore; one FLOP = one multiply-add).

    python tools/analyze_detector.py --config-file configs/mask_rcnn_hiera_b.py [--backbone-only]
        [--image-size 1024] [key=value ...]

FLOPs are those of inference on one `image-size` square image, counted by fvcore through
Detectron2's `FlopCountAnalysis` (softmax, elementwise ops and pooling are not counted, as in
ViTDet's and the paper's tables). Attention products count: ``q @ k^T`` and ``attn @ v`` are
`aten::matmul` (counted by fvcore) or, with ``use_sdpa=True``, `aten::scaled_dot_product_attention`
(counted by the handler below). The RoI heads run on the maximum number of boxes (1000 proposals,
100 detections; the score threshold is set to 0 so a randomly initialised model reaches it), which
is what a trained model does on a typical COCO image.
"""

from __future__ import annotations

import argparse
import time

import torch
from detectron2.config import LazyConfig, instantiate

from hiera_det.config_check import ConfigOverrideError, load_config
from hiera_det.predictor import score_thresh_overrides
from hiera_det.utils.flops import backbone_trunk, flop_analysis


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--backbone-only", action="store_true", help="count Hiera alone")
    parser.add_argument("opts", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    try:
        cfg = load_config(args.config_file, args.opts)  # fails on unknown keys and wrong types
    except (ConfigOverrideError, FileNotFoundError) as e:
        parser.error(str(e))
    LazyConfig.apply_overrides(cfg, score_thresh_overrides(cfg, 0.0))  # every detection kept
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    trunk = backbone_trunk(model)

    parts = {
        f"backbone ({type(trunk).__name__})": trunk,
        "neck": [m for m in model.backbone.children() if m is not trunk],
        "RPN": model.proposal_generator,
        "RoI heads": model.roi_heads,
    }
    print(f"config: {args.config_file} {' '.join(args.opts)}")
    print(f"parameters: {count_params(model) / 1e6:.2f}M")
    for name, part in parts.items():
        mods = part if isinstance(part, list) else [part]
        print(f"  {name}: {sum(count_params(m) for m in mods) / 1e6:.2f}M")

    s = args.image_size
    image = torch.rand(3, s, s) * 255
    if args.backbone_only:
        flops = flop_analysis(trunk, (image[None],))
    else:
        flops = flop_analysis(model, [{"image": image, "height": s, "width": s}])
    start = time.perf_counter()
    with torch.no_grad():
        total = flops.total()
    print(f"FLOPs at {s}x{s}: {total / 1e12:.3f}T (counted in {time.perf_counter() - start:.0f}s)")
    by_op = flops.by_operator()
    print("  by operator: " + ", ".join(f"{k} {v / 1e9:.1f}G" for k, v in by_op.items()))
    skipped = flops.unsupported_ops()
    if skipped:
        print("  not counted: " + ", ".join(f"{k} x{v}" for k, v in skipped.items()))


if __name__ == "__main__":
    main()
