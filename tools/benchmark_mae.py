#!/usr/bin/env python
"""MAE training-step throughput: ours vs the official `hiera-transformer`, and sparse vs dense.

    python tools/benchmark_mae.py --size tiny --batch 8 [--steps 10 --warmup 3 --device cpu] \
        [--amp fp16|bf16] [--compile] [--flops] [--json FILE]

A step is forward + backward + AdamW update at 224 px, mask ratio 0.6, the full decoder (8 x 512,
16 heads), in fp32 or under autocast (`--amp`; fp16 with a `GradScaler`, as MAE trains). Both
models hold the same weights and get the same images and masks; their steps alternate, so a noisy
shared machine slows both alike. Printed: the median step time and images/s of each, their ratio,
the speed-up of sparse pretraining (masked units deleted before the encoder) over running our
encoder on every unit (same decoder and loss) and, on CUDA, each variant's memory: the largest
growth of allocated memory during a step over the resting state (weights and optimizer state of
all variants), and the peak allocated. `--compile` adds the variant "ours (compiled step)": the
same weights with `compile_step=True` (the whole step compiled with ``fullgraph=True``), and on CUDA
"ours (compiled step, CUDA graphs)" (``mode="reduce-overhead"``); the first step of each variant,
which compiles, is reported apart. `--flops` counts one step's FLOPs (forward + backward, two per
multiply-add, `torch.utils.flop_counter`) and prints each variant's achieved GFLOP/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from hiera_det.checkpoint import convert_mae_checkpoint
from hiera_det.mae.model import build_mae


def step_sparse(model, images, visible):
    return model.reconstruct(images, visible)[0]


def step_dense(model, images, visible):
    """The same MAE, but the encoder runs on every unit (nothing deleted, nothing zeroed)."""
    every = torch.arange(visible.shape[1], device=visible.device).expand_as(visible)
    latent = model.forward_encoder(images, every)
    pred = model.forward_decoder(latent, every, model.unit_grid(images))
    return model.forward_loss(images, pred, model.kept_units(visible, model.unit_grid(images)))


def step_official(model, images, visible):
    return model(images, mask=visible)[0]


def timed(step, model, optimizer, scaler, images, visible, amp) -> dict:
    """One training step; its wall time and (CUDA) memory."""
    device = images.device
    cuda = device.type == "cuda"
    optimizer.zero_grad(set_to_none=True)  # before the step: the resting state holds no gradients
    if cuda:
        torch.cuda.synchronize()
        resting = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    with autocast:
        loss = step(model, images, visible)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if cuda:
        torch.cuda.synchronize()
    out = {"time_s": time.perf_counter() - start, "loss": loss.item()}
    if cuda:
        out["peak_MB"] = torch.cuda.max_memory_allocated() / 2**20
        out["growth_MB"] = (torch.cuda.max_memory_allocated() - resting) / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", help="tiny, small, base, base_plus, large, huge")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-official", action="store_true", help="only sparse vs dense")
    parser.add_argument("--amp", choices=["fp16", "bf16"], help="autocast (default: fp32)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the compiled step (compile_step=True; on CUDA also with CUDA graphs)",
    )
    parser.add_argument("--flops", action="store_true", help="count a step's FLOPs")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    amp = {None: None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.amp]

    torch.manual_seed(0)
    ours = build_mae(args.size, mask_ratio=args.mask_ratio).to(device).train()
    variants = {"ours (sparse)": (step_sparse, ours), "ours (dense encoder)": (step_dense, ours)}
    if args.compile:
        modes = {"ours (compiled step)": True}
        if device.type == "cuda":
            modes["ours (compiled step, CUDA graphs)"] = {"mode": "reduce-overhead"}
        for name, option in modes.items():
            compiled = build_mae(args.size, mask_ratio=args.mask_ratio, compile_step=option)
            compiled.load_state_dict(ours.state_dict())
            variants[name] = (step_sparse, compiled.to(device).train())
    if not args.no_official:
        from hiera import hiera_mae

        official = getattr(hiera_mae, f"mae_hiera_{args.size}_224")(pretrained=False)
        ours.load_state_dict(convert_mae_checkpoint(official.state_dict()), strict=True)
        variants["official (sparse)"] = (step_official, official.to(device).train())
    optims = {
        name: torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        for name, (_, model) in variants.items()
    }

    # fp16 needs loss scaling; a disabled scaler passes fp32 / bf16 steps through unchanged.
    scalers = {
        name: torch.amp.GradScaler(device.type, enabled=amp is torch.float16) for name in variants
    }
    images = torch.randn(args.batch, 3, 224, 224, device=device)
    steps = {name: [] for name in variants}
    first = {}
    for i in range(args.warmup + args.steps):
        visible = ours.random_visible(args.batch, (7, 7))
        for name, (step, model) in variants.items():
            out = timed(step, model, optims[name], scalers[name], images, visible, amp)
            if i >= args.warmup:
                steps[name].append(out)
            elif i == 0:
                first[name] = out["time_s"]
    flops = step_flops(ours, images, amp) if args.flops else None
    report(args, device, steps, first, flops)


def step_flops(model, images: torch.Tensor, amp) -> float:
    """FLOPs of one sparse step's forward and backward (2 per multiply-add); no update."""
    from torch.utils.flop_counter import FlopCounterMode

    visible = model.random_visible(images.shape[0], (7, 7))
    autocast = torch.autocast(images.device.type, dtype=amp) if amp else contextlib.nullcontext()
    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss = step_sparse(model, images, visible)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def report(args, device, steps: dict[str, list[dict]], first: dict, flops: float | None) -> None:
    """Print the medians, ratios and memory; write them to `args.json` if given."""
    threads = torch.get_num_threads() if device.type == "cpu" else None
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"MAE Hiera-{args.size}, 224 px, batch {args.batch}, mask ratio {args.mask_ratio}, "
        f"{args.amp or 'fp32'}, {where}{f' ({threads} threads)' if threads else ''}, "
        f"median of {args.steps} steps"
    )
    results = {}
    for name, outs in steps.items():
        t = statistics.median(o["time_s"] for o in outs)
        r = {"median_s": t, "images_per_s": args.batch / t, "last_loss": outs[-1]["loss"]}
        r["first_step_s"] = first.get(name)
        if flops is not None and name != "ours (dense encoder)":  # the dense one does more work
            r["achieved_GFLOPs"] = flops / t / 1e9
        if "peak_MB" in outs[0]:
            r["growth_MB"] = max(o["growth_MB"] for o in outs)
            r["peak_MB"] = max(o["peak_MB"] for o in outs)
        results[name] = r
        memory = f"  +{r['growth_MB']:.0f} MB in a step" if "growth_MB" in r else ""
        if "achieved_GFLOPs" in r:
            memory += f"  {r['achieved_GFLOPs']:.1f} GFLOP/s"
        if r["first_step_s"] is not None:
            memory += f"  (first step {r['first_step_s']:.1f} s)"
        print(f"  {name:26s} {t * 1000:8.1f} ms/step  {r['images_per_s']:7.2f} images/s{memory}")
    summary = {}
    if flops is not None:
        summary["step_GFLOP"] = flops / 1e9
        print(f"  one step: {flops / 1e9:.1f} GFLOP (forward + backward, 2 per multiply-add)")
    for name in ("ours (compiled step)", "ours (compiled step, CUDA graphs)"):
        if name not in results:
            continue
        key = name[len("ours (") : -1].replace(", ", "_").replace(" ", "_")
        over = {"eager": ("ours (sparse)", "our"), "official": ("official (sparse)", "official")}
        for what, (base, label) in over.items():
            if base in results:
                ratio = results[base]["median_s"] / results[name]["median_s"]
                summary[f"{key}_over_{what}_throughput"] = ratio
                print(f"  {name[6:-1]} / {label} eager throughput: {ratio:.2f}x")
    if "official (sparse)" in results:
        summary["ours_over_official_throughput"] = (
            results["official (sparse)"]["median_s"] / results["ours (sparse)"]["median_s"]
        )
        print(f"  ours / official throughput: {summary['ours_over_official_throughput']:.2f}x")
        if "growth_MB" in results["ours (sparse)"]:
            summary["ours_over_official_memory"] = (
                results["ours (sparse)"]["growth_MB"] / results["official (sparse)"]["growth_MB"]
            )
            print(f"  ours / official step memory: {summary['ours_over_official_memory']:.2f}x")
    summary["sparse_over_dense_throughput"] = (
        results["ours (dense encoder)"]["median_s"] / results["ours (sparse)"]["median_s"]
    )
    print(f"  sparse / dense-encoder throughput: {summary['sparse_over_dense_throughput']:.2f}x")
    if args.json:
        meta = {k: getattr(args, k) for k in ("size", "batch", "steps", "warmup", "mask_ratio")}
        meta.update(amp=args.amp or "fp32", device=where)
        with open(args.json, "w") as f:
            json.dump({**meta, "variants": results, **summary}, f, indent=1)


if __name__ == "__main__":
    main()
