#!/usr/bin/env python
"""Where a detector's inference time goes: `torch.profiler` operator tables per part of the model.

    python tools/profile_detector.py --config-file configs/mask_rcnn_hiera_b.py \\
        [--dtype fp32|bf16] [--size 1024] [--warmup 1] [--top 8] [--shapes] [--opts key=value ...]

One image (random weights, random pixels, `--size` square), box score threshold 0 so the mask head
runs on the full 100 detections, as in tools/benchmark.py. After `--warmup` untimed passes, one
pass runs under `torch.profiler` (CPU activities). Each operator's self time is charged to the
innermost part of the model that called it: preprocessing, backbone trunk, FPN, RPN, RoI box
pooler / head / predictor, RoI heads' own work (box inference: decoding, NMS), mask pooler, mask
head (with mask inference) and post-processing (box rescaling and mask pasting). Printed as
Markdown: one table of the parts, then each part's most expensive operators (with `--shapes`, one
row per operator and input shapes). The profiler adds a little time per operator; the part shares
are what to read.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import sys
import time

import torch
from detectron2.modeling.meta_arch import rcnn
from torch.autograd.profiler import record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (tools/benchmark.py: the same models and inputs)

POST = "post-processing (rescale, paste masks)"
PREFIX = "## "  # names of our record_function regions
PARTS = {  # attribute path under the detector -> part name
    "backbone.bottom_up": "backbone trunk",
    "backbone.net": "backbone trunk",
    "backbone": "FPN",
    "proposal_generator": "RPN",
    "roi_heads": "RoI heads (box inference, NMS)",
    "roi_heads.box_pooler": "RoI box pooler",
    "roi_heads.box_head": "RoI box head",
    "roi_heads.box_predictor": "RoI box predictor",
    "roi_heads.mask_pooler": "RoI mask pooler",
    "roi_heads.mask_head": "RoI mask head (+ mask inference)",
}


def mark_parts(model: torch.nn.Module) -> list[str]:
    """Wrap each present part's forward (and the detector's pre/post-processing) in a region."""
    names = []
    for path, name in PARTS.items():
        module = functools.reduce(lambda m, a: getattr(m, a, None), path.split("."), model)
        if isinstance(module, torch.nn.Module) and name not in names:
            module.forward = in_region(name, module.forward)
            names.append(name)
    model.preprocess_image = in_region("preprocessing", model.preprocess_image)
    # GeneralizedRCNN calls its static `_postprocess`, which calls this module-level function.
    rcnn.detector_postprocess = in_region(POST, rcnn.detector_postprocess)
    return ["preprocessing", *names, POST]


def in_region(name: str, fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with record_function(PREFIX + name):
            return fn(*args, **kwargs)

    return wrapped


def innermost_region(event) -> str:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(PREFIX):
        parent = parent.cpu_parent
    return parent.name[len(PREFIX) :] if parent is not None else "other"


def charge(events, shapes: bool = False) -> dict[str, collections.Counter]:
    """Self time (us) of every operator (and its input shapes), keyed by the part that ran it."""
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for event in events:
        if not event.name.startswith(PREFIX):
            key = f"{event.name} {event.input_shapes}" if shapes else event.name
            table[innermost_region(event)][key] += event.self_cpu_time_total
    return table


def print_tables(table, parts: list[str], top: int, header: str) -> None:
    total = sum(sum(ops.values()) for ops in table.values())
    print(f"{header}\n\n| part | ms | share |\n|---|---|---|")
    for part in [*parts, "other"]:
        ms = sum(table[part].values()) / 1e3
        if ms:
            print(f"| {part} | {ms:.0f} | {100 * ms * 1e3 / total:.1f}% |")
    print(f"| total (operators' self time, under the profiler) | {total / 1e3:.0f} | |\n")
    for part in [*parts, "other"]:
        if not table[part]:
            continue
        print(f"{part}:\n\n| operator | ms | share of the part |\n|---|---|---|")
        part_total = sum(table[part].values())
        for op, us in table[part].most_common(top):
            print(f"| `{op}` | {us / 1e3:.1f} | {100 * us / part_total:.1f}% |")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--top", type=int, default=8, help="operators listed per part")
    parser.add_argument("--shapes", action="store_true", help="one row per operator and shapes")
    parser.add_argument("--opts", nargs="*", default=[], help="overrides for the config file")
    args = parser.parse_args()

    from hiera_det.config_check import ConfigOverrideError

    benchmark.make_inputs(args.size, 1, "cpu", with_targets=False)
    try:
        model, run = benchmark.build(args.config_file, "inference", args.opts)
    except ConfigOverrideError as e:  # a typo'd --opts key: name it, as tools/benchmark.py does
        raise SystemExit(f"{args.config_file}: {e}") from None
    model.eval()
    parts = mark_parts(model)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if args.dtype == "bf16"
        else contextlib.nullcontext()
    )
    with torch.no_grad(), autocast:
        for _ in range(args.warmup):
            run()
        start = time.perf_counter()
        cpu = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=cpu, record_shapes=args.shapes) as prof:
            run()
        wall = time.perf_counter() - start
    header = (
        f"{args.config_file}, {args.dtype}, {args.size} px, batch 1, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; profiled pass {wall:.2f} s wall"
    )
    print_tables(charge(prof.events(), args.shapes), parts, args.top, header)


if __name__ == "__main__":
    main()
