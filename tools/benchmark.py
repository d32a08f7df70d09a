#!/usr/bin/env python
"""Benchmark detectors and backbones side by side: parameters, FLOPs, latency, memory.

    python tools/benchmark.py --config-file configs/mask_rcnn_hiera_b.py --vs vitdet_b \\
        [--task inference|train|backbone] [--dtype fp32|bf16|fp16 ...] [--size 1024] [--batch 1] \\
        [--iters 5] [--warmup 1] [--device cuda|cpu] [--flops] [--peak] [--onnx] [--json FILE] \\
        [--opts key=value ...]

Each model is measured in its own subprocess, one after the other in this run, so that peak memory
is its own; ratios are printed against the first model. A model is a LazyConfig file or a built-in
name: `vitdet_b` / `vitdet_l` (Detectron2's ViTDet Mask R-CNN from its bundled
`common/models/mask_rcnn_vitdet.py`, L with ViTDet's L settings), `mvitv2_b` / `swin_b`
(Detectron2's MViTv2-B / Swin-B backbones in the project's baseline configs
`projects/ViTDet-Hiera/configs/COCO/mask_rcnn_{mvitv2,swin}_b.py`) and, for `--task backbone`,
`official_hiera_<size>` (the `hiera-transformer` package, returning its four stage outputs).
`--opts` overrides apply to every config-file model.

Measured: latency after `--warmup` iterations (median/min/max of `--iters`; on CUDA every
iteration ends with `torch.cuda.synchronize()`, so the host clock spans the GPU work), the first
warm-up iteration's time ("first s": it includes one-time work, such as the compilation of a
config with `model.backbone.bottom_up.compile=True`), throughput
(images/s), peak memory (CUDA: max allocated; CPU: peak resident set size of the process and its
growth over the built model), FLOPs with `--flops` (fvcore, one multiply-add = one FLOP, attention
counted; `hiera_det.utils.flops`) and, with `--peak`, this machine's fp32 and bf16 matmul throughput
for context (a CPU without bf16 matrix instructions gets a warning when bf16 is asked for).
With `--onnx` (inference), the first model is also exported by tools/export_model.py (random
weights) and `hiera_det.export.OnnxPredictor` (ONNX Runtime, CPU) is timed on the same image in
its own subprocess, as the row `onnx:<config>`, followed by the export time and the export's check.
For inference the box score threshold is 0, so every model runs its mask head on the full 100
detections, as a trained model does on a typical COCO image. Several `--dtype` values are measured
one after the other on the same built model (one table each); `--json` writes every result.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

BUILTINS = ("vitdet_b", "vitdet_l")
# Detectron2's MViTv2-B and Swin-B backbones (detectron2.modeling.MViT / SwinTransformer) as
# ViTDet configures them, in Mask R-CNN with the paper's LN heads: the project's baseline configs.
BASELINES = {
    "mvitv2_b": "projects/ViTDet-Hiera/configs/COCO/mask_rcnn_mvitv2_b.py",
    "swin_b": "projects/ViTDet-Hiera/configs/COCO/mask_rcnn_swin_b.py",
}


def load_model_config(spec: str, opts: list[str]):
    """The LazyConfig of a built-in name or a config file; `opts` (checked by
    `hiera_det.config_check.load_config`) apply to config files only."""
    from detectron2 import model_zoo

    from hiera_det.config_check import load_config

    if spec in BUILTINS:
        cfg = model_zoo.get_config("common/models/mask_rcnn_vitdet.py")
        if spec == "vitdet_l":  # ViTDet's L: projects/ViTDet/configs/COCO/mask_rcnn_vitdet_l_100ep
            net = cfg.model.backbone.net
            net.embed_dim, net.depth, net.num_heads, net.drop_path_rate = 1024, 24, 16, 0.4
            net.window_block_indexes = [i for i in range(24) if i not in (5, 11, 17, 23)]
        return cfg
    if spec in BASELINES:
        spec = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), BASELINES[spec]
        )
    if not os.path.isfile(spec):
        names = BUILTINS + tuple(BASELINES)
        raise SystemExit(f"no such config file or built-in model: {spec!r} (built-ins: {names})")
    return load_config(spec, opts)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build(spec: str, task: str, opts: list[str]):
    """Return (module, make_inputs, run) for a spec."""
    torch.manual_seed(0)
    if spec.startswith("official_hiera_"):
        import hiera

        if task != "backbone":
            raise SystemExit("official_hiera_* models only support --task backbone")
        # The official model fixes its input size (and position table) at construction.
        name = f"{spec[len('official_') :]}_224"
        model = getattr(hiera, name)(pretrained=False, input_size=tuple(IMAGES.shape[-2:]))
        return model, lambda: model(IMAGES, return_intermediates=True)
    from detectron2.config import LazyConfig, instantiate

    from hiera_det.predictor import score_thresh_overrides
    from hiera_det.utils.flops import backbone_trunk

    cfg = load_model_config(spec, opts)
    LazyConfig.apply_overrides(cfg, score_thresh_overrides(cfg, 0.0))  # every detection kept
    model = instantiate(cfg.model)
    if task == "backbone":
        net = backbone_trunk(model)
        return net, lambda: net(IMAGES)
    if task == "inference":
        return model, lambda: model(DETECTION_INPUTS)
    return model, lambda: train_step(model)


IMAGES: torch.Tensor
DETECTION_INPUTS: list[dict]


def make_inputs(size: int, batch: int, device: str, with_targets: bool) -> None:
    global IMAGES, DETECTION_INPUTS
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(0)
    IMAGES = torch.randn(batch, 3, size, size, generator=g).to(device)
    DETECTION_INPUTS = []
    for _ in range(batch):
        item = {"image": (torch.rand(3, size, size, generator=g) * 255).to(device)}
        item.update(height=size, width=size)
        if with_targets:  # 20 random objects with box-shaped masks
            xy = torch.rand(20, 2, generator=g) * size * 0.7
            wh = torch.rand(20, 2, generator=g) * size * 0.3 + 16
            boxes = torch.cat([xy, xy + wh], dim=1)
            masks = torch.zeros(20, size, size, dtype=torch.bool)
            for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                masks[i, y0:y1, x0:x1] = True
            inst = Instances((size, size))
            inst.gt_boxes = Boxes(boxes)
            inst.gt_classes = torch.randint(0, 80, (20,), generator=g)
            inst.gt_masks = BitMasks(masks)
            item["instances"] = inst.to(device)
        DETECTION_INPUTS.append(item)


def train_step(model) -> None:
    from detectron2.utils.events import EventStorage

    with EventStorage(0):  # Detectron2's losses log into the trainer's event storage
        losses = model(DETECTION_INPUTS)
    sum(losses.values()).backward()
    for p in model.parameters():
        p.grad = None


ONNX_PREFIX = "onnx:"


def onnx_worker(args, config_file: str) -> dict:
    """Export `config_file` (random weights) with tools/export_model.py in a subprocess, then time
    `OnnxPredictor` (ONNX Runtime, CPU) on the benchmark image; no PyTorch model in this process."""
    import tempfile

    import numpy as np

    from hiera_det.export import OnnxPredictor
    from hiera_det.predictor import score_thresh_overrides

    if args.task != "inference" or args.batch != 1:
        raise SystemExit("--onnx measures --task inference at --batch 1")
    opts = [*args.opts, *score_thresh_overrides(load_model_config(config_file, args.opts), 0.0)]
    opts.append("train.init_checkpoint=")
    with tempfile.TemporaryDirectory(prefix="benchmark_onnx_") as out:  # ~300 MB for B
        tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_model.py")
        cmd = [sys.executable, tool, "--config-file", config_file, "--output", out, *opts]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"export of {config_file} failed (exit {proc.returncode})")
        with open(os.path.join(out, "export.json")) as f:
            report = json.load(f)
        make_inputs(args.size, args.batch, "cpu", with_targets=False)
        rgb = DETECTION_INPUTS[0]["image"].permute(1, 2, 0).numpy()  # the PyTorch runs' image
        bgr = np.ascontiguousarray(rgb[:, :, ::-1]).astype(np.uint8)
        base_rss = rss_mb()
        predictor = OnnxPredictor(config_file, os.path.join(out, "model.onnx"), opts)
        for _ in range(args.warmup):
            predictor(bgr)
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            predictor(bgr)
            times.append(time.perf_counter() - start)
    med = statistics.median(times)
    return {
        "model": ONNX_PREFIX + config_file,
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "images_per_s": 1 / med,
        "peak_mem_MB": peak_rss_mb(),
        "peak_growth_MB": max(peak_rss_mb() - base_rss, 0.0),  # the session and its runs
        "export_s": report["export_s"],
        "session_s": report["session_s"],
        "check": report["check"],
        "device": f"cpu x{os.cpu_count()}",
        "dtype": "fp32",  # ONNX Runtime runs the exported fp32 graph
    }


def worker(args) -> list[dict]:
    """Build `args.model` once and measure it in every dtype of `args.dtype`."""
    if args.model.startswith(ONNX_PREFIX):
        return [onnx_worker(args, args.model[len(ONNX_PREFIX) :])]
    device = args.device
    make_inputs(args.size, args.batch, device, with_targets=args.task == "train")
    model, run = build(args.model, args.task, args.opts)
    model.to(device).train(args.task == "train")
    common = {"model": args.model, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    if args.flops and args.task != "train":
        from hiera_det.utils.flops import count_flops

        inputs = DETECTION_INPUTS if args.task == "inference" else (IMAGES,)
        common["flops_G"] = count_flops(model.eval(), inputs) / 1e9
    cpu = f"cpu x{os.cpu_count()}"
    common["device"] = torch.cuda.get_device_name() if device == "cuda" else cpu
    if device == "cuda":  # fp32 rows depend on these (PyTorch's defaults: matmul off, cuDNN on)
        common["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        common["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return [{**common, **measure(args, run, device, name)} for name in args.dtype]


def measure(args, run, device: str, dtype_name: str) -> dict:
    """Latency and peak memory of `run` under autocast to `dtype_name` (fp32: no autocast)."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]

    def step():
        with (
            torch.set_grad_enabled(args.task == "train"),
            torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            run()
        if device == "cuda":
            torch.cuda.synchronize()

    first_s = None
    for i in range(args.warmup):
        start = time.perf_counter()
        step()
        if i == 0:  # includes one-time work: torch.compile's compilation, oneDNN's kernel setup
            first_s = time.perf_counter() - start
    base = rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = {"dtype": dtype_name, "first_s": first_s}
    if device == "cuda":
        result["peak_mem_MB"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mem_MB"] = peak_rss_mb()
        # ru_maxrss can lag the current RSS (statm) a little: a model that needs no new memory
        # (a tiny one) may read slightly below 0.
        result["peak_growth_MB"] = max(peak_rss_mb() - base, 0.0)
    med = statistics.median(times)
    result.update(median_s=med, min_s=min(times), max_s=max(times), images_per_s=args.batch / med)
    return result


MATMUL_N = 2048
PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, device: str, n: int = MATMUL_N, reps: int = 5):
    """``(GFLOP/s, n)`` of an n x n x n matrix product on `device` (median of `reps`).

    The faster of two layouts counts: ``a @ b`` and ``a @ b.T`` (how `F.linear` multiplies). They
    differ where PyTorch has no tuned kernel for the dtype: bf16 on a CPU without AVX-512-BF16 or
    AMX ran at ~1 GFLOP/s as ``a @ b`` and ~17 GFLOP/s as ``a @ b.T`` (2026-12-01, AMD EPYC Zen 3,
    torch 2.14.1). Below 10 GFLOP/s at 256^3, the product is measured at n = 256: 2048^3 would
    take minutes.
    """
    probe = {layout: _product_seconds(dtype, device, 256, layout) for layout in (False, True)}
    transposed = probe[True] < probe[False]
    if 2 * 256**3 / probe[transposed] < 10e9:
        n = 256
    times = [_product_seconds(dtype, device, n, transposed) for _ in range(reps)]
    return 2 * n**3 / statistics.median(times) / 1e9, n


def _product_seconds(dtype: torch.dtype, device: str, n: int, transposed: bool = False) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    b = b.t() if transposed else b
    a @ b  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def cpu_has_bf16_matmul() -> bool:
    """Whether oneDNN finds bf16 matrix instructions (AVX-512-BF16 or AMX) on this CPU."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_slow_bf16(device: str, dtypes: list[str]) -> None:
    """bf16 on a CPU without bf16 matrix instructions is far slower than fp32: say so up front."""
    if device == "cpu" and "bf16" in dtypes and not cpu_has_bf16_matmul():
        print(
            "warning: this CPU has no bf16 matrix instructions (AVX-512-BF16 or AMX; PyTorch's "
            f"capability here: {torch.backends.cpu.get_cpu_capability()}), so bf16 matrix "
            "products run far below fp32 speed (see --peak); bf16 runs will be very slow",
            file=sys.stderr,
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, help="config file or built-in name")
    parser.add_argument("--vs", nargs="*", default=[], help="models to compare against")
    parser.add_argument("--task", choices=["inference", "train", "backbone"], default="inference")
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=["fp32", "bf16", "fp16"],
        default=["fp32"],
        help="one or more; each is measured on the same built model",
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--flops", action="store_true", help="also count FLOPs (slow for L)")
    parser.add_argument("--peak", action="store_true", help="also measure matmul GFLOP/s")
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available"
    )
    parser.add_argument("--json", help="also write every result to this file (a JSON list)")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also export the first model to ONNX and time it with ONNX Runtime (inference)",
    )
    parser.add_argument("--opts", nargs="*", default=[], help="overrides for config files")
    parser.add_argument("--model", help=argparse.SUPPRESS)  # set in worker subprocesses
    args = parser.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")

    if args.model:  # worker: measure one model, print one JSON line
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    from hiera_det.config_check import ConfigOverrideError

    specs = [args.config_file, *args.vs]
    if args.onnx:
        specs.insert(1, ONNX_PREFIX + args.config_file)
    for spec in specs:  # a typo in --opts fails here, before any model is measured
        if not spec.startswith(("official_hiera_", ONNX_PREFIX)):
            try:
                load_model_config(spec, args.opts)
            except ConfigOverrideError as e:
                raise SystemExit(f"{spec}: {e}") from None
    warn_slow_bf16(args.device, args.dtype)
    results = []  # one dict per (model, dtype)
    for spec in specs:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--model", spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"benchmark of {spec} failed (exit {proc.returncode})")
        for r in json.loads(lines[-1][len("RESULT ") :]):
            if "flops_G" in r:
                r["achieved_GFLOPs"] = 2 * r["flops_G"] / r["median_s"]  # multiply-add = 2 FLOPs
            results.append(r)
        print(f"measured {spec}", file=sys.stderr, flush=True)
        if args.json:  # after every model: a run stopped part-way keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    peaks = None
    if args.peak:
        peaks = {name: matmul_peak(t, args.device) for name, t in PEAK_DTYPES.items()}
        if args.json:
            with open(args.json, "w") as f:
                peak_rows = [{"matmul_peak": k, "GFLOPs": g, "n": n} for k, (g, n) in peaks.items()]
                json.dump(results + peak_rows, f, indent=1)
    for dtype in args.dtype:
        print_table(args, [r for r in results if r["dtype"] == dtype], dtype, peaks)


def print_table(args, results: list[dict], dtype: str, peaks: dict | None) -> None:
    """One table of the models measured in `dtype`, ratios against the first."""
    print(
        f"task={args.task} dtype={dtype} size={args.size} batch={args.batch} "
        f"iters={args.iters} warmup={args.warmup} device={results[0]['device']} "
        f"threads={torch.get_num_threads()}"
    )
    first = results[0]
    header = f"{'model':<42}{'params':>9}{'GFLOPs':>9}{'median s':>10}{'min s':>8}{'max s':>8}"
    header += f"{'img/s':>8}{'peak MB':>9}{'growth MB':>10}{'first s':>9}"
    header += f"{'time ratio':>11}{'mem ratio':>10}"
    print(header)
    # Memory ratio: of the growth during the steps (CPU) where the first model has any, else of
    # the peak (CUDA, or a model too small to grow the process).
    mem_key = "peak_growth_MB" if first.get("peak_growth_MB", 0) > 0 else "peak_mem_MB"
    for r in results:
        flops = f"{r['flops_G']:.0f}" if "flops_G" in r else "-"
        growth = f"{r['peak_growth_MB']:.0f}" if "peak_growth_MB" in r else "-"
        params = f"{r['params_M']:.1f}M" if "params_M" in r else "-"
        first_s = f"{r['first_s']:.2f}" if r.get("first_s") is not None else "-"
        print(
            f"{r['model'][-42:]:<42}{params:>9}{flops:>9}{r['median_s']:>10.3f}"
            f"{r['min_s']:>8.3f}{r['max_s']:>8.3f}{r['images_per_s']:>8.2f}"
            f"{r['peak_mem_MB']:>9.0f}{growth:>10}{first_s:>9}"
            f"{r['median_s'] / first['median_s']:>11.2f}"
            f"{r[mem_key] / first[mem_key]:>10.2f}"
        )
    for r in results:
        if "export_s" in r:
            print(
                f"{r['model']}: export {r['export_s']:.1f} s (tools/export_model.py, random "
                f"weights), session {r['session_s']:.1f} s; check vs PyTorch: {r['check']}"
            )
    if peaks:
        (fp32, n32), (bf16, n16) = peaks["fp32"], peaks["bf16"]
        print(
            f"matmul peak here ({args.device}): fp32 {fp32:.1f} GFLOP/s ({n32}^3), "
            f"bf16 {bf16:.1f} GFLOP/s ({n16}^3)"
        )
        peak = bf16 if dtype == "bf16" else fp32
        for r in results:
            if "achieved_GFLOPs" in r:
                print(
                    f"  {r['model']}: {r['achieved_GFLOPs']:.0f} GFLOP/s achieved "
                    f"({100 * r['achieved_GFLOPs'] / peak:.0f}% of the {dtype} matmul peak)"
                )


if __name__ == "__main__":
    main()
