#!/usr/bin/env python
"""MAE training-step throughput: ours vs the official `hiera-transformer`, and sparse vs dense.

    python tools/benchmark_mae.py --size tiny --batch 8 [--steps 10 --warmup 3 --device cpu]

A step is forward + backward + AdamW update at 224 px, fp32, mask ratio 0.6, the full decoder
(8 x 512, 16 heads). Both models hold the same weights and get the same images and masks; their
steps alternate, so a noisy shared machine slows both alike. Printed: the median step time and
images/s of each, their ratio, and the speed-up of sparse pretraining (masked units deleted before
the encoder) over running our encoder on every unit (same decoder and loss).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hiera_det.checkpoint import convert_mae_checkpoint
from hiera_det.mae.model import build_mae


def step_sparse(model, images, visible):
    return model.reconstruct(images, visible)[0]


def step_dense(model, images, visible):
    """The same MAE, but the encoder runs on every unit (nothing deleted, nothing zeroed)."""
    every = torch.ones_like(visible)
    latent = model.forward_encoder(images, every)
    pred = model.forward_decoder(latent, every, model.unit_grid(images))
    return model.forward_loss(images, pred, visible)


def step_official(model, images, visible):
    return model(images, mask=visible)[0]


def timed(step, model, optimizer, images, visible, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = step(model, images, visible)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", help="tiny, small, base, base_plus, large, huge")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-official", action="store_true", help="only sparse vs dense")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    ours = build_mae(args.size, mask_ratio=args.mask_ratio).to(device).train()
    variants = {"ours (sparse)": (step_sparse, ours), "ours (dense encoder)": (step_dense, ours)}
    if not args.no_official:
        from hiera import hiera_mae

        official = getattr(hiera_mae, f"mae_hiera_{args.size}_224")(pretrained=False)
        ours.load_state_dict(convert_mae_checkpoint(official.state_dict()), strict=True)
        variants["official (sparse)"] = (step_official, official.to(device).train())
    optims = {
        name: torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        for name, (_, model) in variants.items()
    }

    images = torch.randn(args.batch, 3, 224, 224, device=device)
    times = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        visible = ours.random_visible(args.batch, (7, 7))
        for name, (step, model) in variants.items():
            t = timed(step, model, optims[name], images, visible, device)
            if i >= args.warmup:
                times[name].append(t)

    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(
        f"MAE Hiera-{args.size}, 224 px, batch {args.batch}, mask ratio {args.mask_ratio}, fp32, "
        f"{device.type}{f' ({threads} threads)' if threads else ''}, median of {args.steps} steps"
    )
    median = {name: statistics.median(ts) for name, ts in times.items()}
    for name, t in median.items():
        print(f"  {name:22s} {t * 1000:8.1f} ms/step  {args.batch / t:7.2f} images/s")
    if "official (sparse)" in median:
        ratio = median["official (sparse)"] / median["ours (sparse)"]
        print(f"  ours / official throughput: {ratio:.2f}x")
    speedup = median["ours (dense encoder)"] / median["ours (sparse)"]
    print(f"  sparse / dense-encoder throughput: {speedup:.2f}x")


if __name__ == "__main__":
    main()
