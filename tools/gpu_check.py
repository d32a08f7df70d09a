#!/usr/bin/env python
"""Check a GPU machine and measure hiera_det on it, in one command: install what is missing from
wheels downloaded elsewhere (for a cluster node without network), run the CUDA tests, train with
AMP, time inference and the MAE step, and write one markdown report (docs/gpu.md).

    bash tools/gpu_wheels.sh                                       # with network, once
    python3 tools/gpu_check.py --wheels .gpu_wheels --output OUT   # on the GPU machine
    python tools/gpu_check.py --cpu-smoke --output /tmp/smoke      # any machine: tiny, on the CPU

Steps (each a subprocess with its own time limit; a step that fails or runs out of time is
reported as such and the next one still runs):

0. install: every carried wheel whose module is missing, ``pip install --no-index --no-deps
   --target WORK/site`` (nothing already on the machine is replaced);
1. tests: ``pytest -m cuda tests/test_cuda.py`` (CUDA vs CPU fp32 outputs, AMP training steps,
   DefaultPredictor, the MAE); while they run, the synthetic shapes dataset is drawn at 1024 px;
2. train: train_net.py, AMP (fp16), on that dataset: Hiera-B Mask R-CNN
   (configs/mask_rcnn_hiera_b.py), then ViTDet-B (projects/ViTDet-Hiera/configs/COCO/
   mask_rcnn_vitdet_b.py, the same heads and recipe), random init: s/iter and peak memory as
   Detectron2 logs them;
3. inference: tools/benchmark.py at 1024, batch 1, fp32 and fp16 autocast: Hiera-B, B+, L vs
   MViTv2-B, Swin-B, ViTDet-B, ViTDet-L, ratios next to the paper's Table 10 (V100, fp32);
4. MAE: tools/benchmark_mae.py, Hiera-B, 224 px, fp16 AMP: ours vs the official hiera-transformer
   MAE (throughput, memory) and sparse vs dense encoder.

Each step's time limit is `STEP_LIMITS` (``--limit STEP=SECONDS`` changes one); ``--time-limit``
adds a deadline for the whole run that cuts a late step short.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Seconds per step before it is stopped: generous for one GPU (a step that hangs is stopped, a
# slow one finishes). --limit STEP=SECONDS changes one.
STEP_LIMITS = {
    "install": 300,
    "tests": 900,  # the dataset is drawn meanwhile
    "data": 300,  # only what is left of drawing it after the tests
    "train Hiera-B": 900,
    "train ViTDet-B": 900,
    "inference": 1800,  # 7 models x (fp32, fp16), each model in its own process
    "mae": 900,
}
# --cpu-smoke: the same steps, tiny, on a CPU; generous, as small machines are often shared.
SMOKE_LIMITS = dict.fromkeys(STEP_LIMITS, 300)

# Carried wheels -> the module whose absence means "install it" (others: the distribution name).
MODULE_OF = {
    "sal_detectron2": "detectron2",
    "hydra_core": "hydra",
    "antlr4_python3_runtime": "antlr4",
    "hiera_transformer": "hiera",
    "absl_py": "absl",
    "pyyaml": "yaml",
    "protobuf": "google.protobuf",
    "setuptools": "pkg_resources",  # Detectron2's model_zoo needs it; setuptools >= 81 lacks it
}

# What the steps import besides the carried wheels' modules: the image must have these.
NEEDED_MODULES = ("torch", "torchvision", "timm", "cv2", "scipy", "matplotlib", "PIL", "numpy")
NEEDED_MODULES += tuple(MODULE_OF.values()) + ("fvcore", "iopath", "pycocotools", "pytest")

# The paper's Table 10 (Mask R-CNN, COCO, V100, fp32 test time in ms); ratios within a family.
TABLE10_MS = {
    "Hiera-B": 173,
    "Hiera-B+": 192,
    "MViTv2-B": 208,
    "Swin-B": 164,
    "ViTDet-B": 201,
    "Hiera-L": 340,
    "ViTDet-L": 396,
}
FAMILY_BASE = {"B": "Hiera-B", "L": "Hiera-L"}
INFERENCE_MODELS = [  # (name, benchmark.py model, family)
    ("Hiera-B", "configs/mask_rcnn_hiera_b.py", "B"),
    ("Hiera-B+", "configs/mask_rcnn_hiera_b_plus.py", "B"),
    ("MViTv2-B", "mvitv2_b", "B"),
    ("Swin-B", "swin_b", "B"),
    ("ViTDet-B", "vitdet_b", "B"),
    ("Hiera-L", "configs/mask_rcnn_hiera_l.py", "L"),
    ("ViTDet-L", "vitdet_l", "L"),
]
TRAIN_MODELS = [  # (name, config)
    ("Hiera-B", "configs/mask_rcnn_hiera_b.py"),
    ("ViTDet-B", "projects/ViTDet-Hiera/configs/COCO/mask_rcnn_vitdet_b.py"),
]


@dataclass
class Settings:
    """Sizes of one run: the real one (`real`) or the CPU smoke run (`smoke`)."""

    image_size: int
    num_train: int
    num_val: int
    train_iters: int
    train_batch: int
    workers: int
    inference_models: list
    dtypes: list
    bench_iters: int
    bench_warmup: int
    mae_size: str
    mae_batch: int
    mae_steps: int
    mae_warmup: int
    mae_amp: str | None
    limits: dict
    opts: dict = field(default_factory=dict)  # extra overrides: "heads", "hiera", "vit"


def step_limits(defaults: dict, changes: list[str]) -> dict:
    """`defaults` with the ``STEP=SECONDS`` of `changes` applied; a ValueError names a bad one."""
    limits = dict(defaults)
    for change in changes:
        step, _, seconds = change.rpartition("=")
        if step not in limits or not seconds.replace(".", "", 1).isdigit():
            raise ValueError(
                f"--limit {change!r}: expected STEP=SECONDS with STEP one of {list(limits)}"
            )
        limits[step] = float(seconds)
    return limits


def real_settings(args) -> Settings:
    return Settings(
        image_size=1024,
        num_train=16,
        num_val=2,
        train_iters=args.train_iters,
        train_batch=args.train_batch,
        workers=6,
        inference_models=INFERENCE_MODELS,
        dtypes=["fp32", "fp16"],
        bench_iters=10,
        bench_warmup=3,
        mae_size="base",
        mae_batch=args.mae_batch,
        mae_steps=10,
        mae_warmup=3,
        mae_amp="fp16",
        limits=step_limits(STEP_LIMITS, args.limit),
    )


def smoke_settings(args) -> Settings:
    """Tiny models at 128 px, 4 iterations; bf16 stands in for fp16 (slow on most CPUs)."""
    s = 128
    heads = [
        f"model.backbone.square_pad={s}",
        "model.backbone.out_channels=32",
        "model.proposal_generator.head.in_channels=32",
        "model.roi_heads.box_head.input_shape.channels=32",
        "model.roi_heads.box_head.conv_dims=[32,32]",
        "model.roi_heads.box_head.fc_dims=[64]",
        "model.roi_heads.box_predictor.input_shape.channels=64",
        "model.roi_heads.mask_head.input_shape.channels=32",
        "model.roi_heads.mask_head.conv_dims=[32,32]",
        "model.proposal_generator.pre_nms_topk=[200,100]",
        "model.proposal_generator.post_nms_topk=[100,50]",
        "model.roi_heads.batch_size_per_image=32",
    ]
    hiera = [
        "model.backbone.bottom_up.embed_dim=16",
        "model.backbone.bottom_up.num_heads=1",
        "model.backbone.bottom_up.stages=[1,1,3,1]",
        "model.backbone.bottom_up.global_blocks=[4]",
    ]
    vit = [
        "model.backbone.net.embed_dim=32",
        "model.backbone.net.depth=2",
        "model.backbone.net.num_heads=2",
        "model.backbone.net.window_block_indexes=[0]",
        f"model.backbone.net.img_size={s}",
    ]
    aug = [
        f"dataloader.train.mapper.augmentations.1.target_height={s}",
        f"dataloader.train.mapper.augmentations.1.target_width={s}",
        f"dataloader.train.mapper.augmentations.2.crop_size=[{s},{s}]",
        f"dataloader.test.mapper.augmentations.0.short_edge_length={s}",
        f"dataloader.test.mapper.augmentations.0.max_size={s}",
    ]
    return Settings(
        image_size=s,
        num_train=4,
        num_val=2,
        train_iters=4,  # Detectron2 times the iterations after its first 3
        train_batch=2,
        workers=0,
        inference_models=INFERENCE_MODELS[:2],
        dtypes=["fp32", "bf16"],
        bench_iters=1,
        bench_warmup=0,
        mae_size="tiny",
        mae_batch=2,
        mae_steps=1,
        mae_warmup=0,
        mae_amp=None,  # fp32: autocast makes the MAE step many times slower on a CPU
        limits=step_limits(SMOKE_LIMITS, args.limit),
        opts={"heads": heads + aug, "hiera": hiera, "vit": vit},
    )


# ----------------------------------------------------------------------------------------------
# Running steps
# ----------------------------------------------------------------------------------------------


class Runner:
    """Runs step commands with time limits under one global deadline, logging everything."""

    def __init__(self, log_file: Path, env: dict, deadline: float):
        self.log_file, self.env, self.deadline = log_file, env, deadline
        self.steps: list[dict] = []

    def log(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log_file, "a") as f:
            f.write(text + "\n")

    def run(self, name: str, cmd: list[str], limit: float, cwd: Path = ROOT) -> dict:
        """Run `cmd`; returns {name, rc, seconds, status, tail}; never raises."""
        limit = max(1.0, min(limit, self.deadline - time.monotonic()))
        shown = " ".join(cmd)
        shown = shown if len(shown) < 600 else shown[:600] + " ..."
        self.log(f"\n=== {name} (limit {limit:.0f} s): {shown}")
        start = time.monotonic()
        offset = self.log_file.stat().st_size
        # Straight into the log file: if the whole run is killed, what each step said is there.
        with open(self.log_file, "a") as log:
            proc = subprocess.Popen(
                cmd, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                proc.wait(timeout=limit)
                status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status = f"stopped at its {limit:.0f} s limit"
        with open(self.log_file, errors="replace") as log:
            log.seek(offset)
            lines = log.read().splitlines()
        print("\n".join(lines[-15:]), flush=True)
        step = {
            "name": name,
            "rc": proc.returncode,
            "seconds": time.monotonic() - start,
            "status": status,
            "tail": "\n".join(lines[-40:]),
        }
        self.log(f"=== {name}: {status} in {step['seconds']:.1f} s")
        self.steps.append(step)
        return step


def install_wheels(wheels: Path, site: Path, runner: Runner, limit: float) -> dict:
    """Install the carried wheels whose module is missing here into `site`."""
    missing, present = [], []
    for wheel in sorted(wheels.glob("*.whl")):
        dist = wheel.name.split("-")[0].lower()
        module = MODULE_OF.get(dist)
        if module is not None:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:  # a parent package is missing
                found = False
        else:
            try:
                importlib.metadata.version(dist)
                found = True
            except importlib.metadata.PackageNotFoundError:
                found = False
        (present if found else missing).append(wheel)
    runner.log(f"already here: {[w.name.split('-')[0] for w in present]}")
    if not missing:
        return {"name": "install", "status": "ok (nothing missing)", "seconds": 0.0, "tail": ""}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    cmd += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site)]
    step = runner.run("install", [*cmd, *map(str, missing)], limit)
    step["installed"] = [w.name for w in missing]
    return step


def environment(runner: Runner) -> dict:
    """Versions and the GPU as the subprocesses see them."""
    code = (
        "import json, torch, importlib.metadata as m\n"
        "d = {'python': __import__('sys').version.split()[0], 'torch': torch.__version__,\n"
        "     'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name()\n"
        "     if torch.cuda.is_available() else None}\n"
        "for n in ('torchvision', 'sal-detectron2', 'timm', 'hiera-transformer', 'numpy',\n"
        "          'pycocotools', 'fvcore'):\n"
        "    try: d[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: d[n] = 'missing'\n"
        "from importlib.util import find_spec\n"
        f"d['missing modules'] = [n for n in {NEEDED_MODULES!r} if find_spec(n) is None]\n"
        "print('ENV ' + json.dumps(d))\n"
    )
    step = runner.run("environment", [sys.executable, "-c", code], 60)
    env = {}
    for line in step["tail"].splitlines():
        if line.startswith("ENV "):
            env = json.loads(line[4:])
    if shutil.which("nvidia-smi"):  # read-only queries
        query = (
            "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu"
        )
        smi = runner.run(
            "nvidia-smi", ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], 20
        )
        env["nvidia-smi"] = smi["tail"].strip()
    return env


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def pytest_command() -> list[str]:
    """The CUDA tests, verbose, with a line per failure, skip and error at the end."""
    pytest = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py"]
    return [*pytest, "-v", "-rfEs", "-p", "no:cacheprovider"]


def run_tests_and_draw_data(runner: Runner, cfg: Settings, work: Path, tests: bool) -> Path:
    """Step 1 (the CUDA tests, if `tests`), drawing the training data in a second process
    meanwhile."""
    data = work / "synthetic"
    draw = [sys.executable, "-m", "hiera_det.data.synthetic", "--output", str(data)]
    draw += ["--num-train", str(cfg.num_train), "--num-val", str(cfg.num_val)]
    draw += ["--image-size", str(cfg.image_size), str(cfg.image_size)]
    draw_log = open(work / "draw.log", "w")  # closed once the drawing has ended
    drawing = subprocess.Popen(
        draw, cwd=ROOT, env=runner.env, stdout=draw_log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    if tests:
        runner.run("tests", pytest_command(), cfg.limits["tests"])
    start = time.monotonic()
    try:
        drawing.wait(timeout=max(1.0, cfg.limits["data"]))
        status = "ok" if drawing.returncode == 0 else f"failed (exit {drawing.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(drawing.pid, signal.SIGKILL)
        drawing.wait()
        status = "stopped at its limit"
    draw_log.close()
    out = (work / "draw.log").read_text(errors="replace")
    runner.log(f"=== data: {status} (waited {time.monotonic() - start:.1f} s after the tests)")
    runner.log(out or "")
    runner.steps.append(
        {"name": "data", "status": status, "seconds": time.monotonic() - start, "tail": out}
    )
    return data


def train(runner: Runner, cfg: Settings, work: Path, data: Path, name: str, config: str) -> dict:
    """Step 2 for one model: train_net.py with AMP; s/iter and peak memory from its log."""
    out = work / f"train_{name}"
    shutil.rmtree(out, ignore_errors=True)
    opts = [
        f"dataset.train=[gpu_check_train,{data}/annotations/instances_train.json,{data}/train]",
        f"dataset.test=[gpu_check_val,{data}/annotations/instances_val.json,{data}/val]",
        "dataloader.train.mapper.instance_mask_format=bitmask",  # the json holds exact RLE masks
        f"dataloader.train.total_batch_size={cfg.train_batch}",
        f"dataloader.train.num_workers={cfg.workers}",
        f"dataloader.test.num_workers={min(cfg.workers, 2)}",
        "train.init_checkpoint=''",  # random init: nothing to download
        f"train.max_iter={cfg.train_iters}",
        f"train.output_dir={out}",
        f"train.log_period={min(10, cfg.train_iters)}",
        "train.checkpointer.period=1000000",
        "train.eval_period=0",  # one evaluation (of the val images) after the last iteration
        "train.seed=0",
        *cfg.opts.get("heads", []),
        *cfg.opts.get("vit" if "vitdet" in config else "hiera", []),
    ]
    cmd = [sys.executable, "train_net.py", "--num-gpus", "1", "--config-file", config, *opts]
    step = runner.run(f"train {name}", cmd, cfg.limits[f"train {name}"])
    step.update(model=name, config=config, batch=cfg.train_batch, **train_metrics(out))
    return step


def train_metrics(out: Path) -> dict:
    """What Detectron2 wrote: iterations, its s/iter, data time, max memory, first/last loss."""
    result: dict = {}
    log = out / "log.txt"
    text = log.read_text(errors="replace") if log.is_file() else ""
    speed = re.findall(r"Overall training speed: (\d+) iterations in \S+ \(([\d.]+) s / it\)", text)
    if speed:
        result["timed_iters"], result["s_per_iter"] = int(speed[-1][0]), float(speed[-1][1])
    mem = [int(m) for m in re.findall(r"max_mem: (\d+)M", text)]
    if mem:
        result["max_mem_MB"] = max(mem)
    # train_net.py says so when it falls back to fp32 (no CUDA)
    result["precision"] = "fp32 (CPU)" if "training in fp32 on the CPU" in text else "AMP fp16"
    metrics = out / "metrics.json"
    rows = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "total_loss" in row:
                rows.append(row)
    if rows:
        result["iters_done"] = rows[-1]["iteration"] + 1
        result["first_loss"], result["last_loss"] = rows[0]["total_loss"], rows[-1]["total_loss"]
        # Detectron2 logs a median over its last 20 iterations: the steady state at the end.
        result["last_time"] = rows[-1].get("time")
        result["last_data_time"] = rows[-1].get("data_time")
    return result


def inference(runner: Runner, cfg: Settings, work: Path) -> dict:
    """Step 3: tools/benchmark.py, every model in fp32 and the AMP dtype, one process each."""
    results = work / "inference.json"
    results.unlink(missing_ok=True)
    first, *rest = [spec for _, spec, _ in cfg.inference_models]
    cmd = [sys.executable, "tools/benchmark.py", "--config-file", first, "--vs", *rest]
    cmd += ["--task", "inference", "--size", str(cfg.image_size), "--batch", "1"]
    cmd += ["--iters", str(cfg.bench_iters), "--warmup", str(cfg.bench_warmup)]
    cmd += ["--dtype", *cfg.dtypes, "--json", str(results)]
    opts = cfg.opts.get("heads", []) + cfg.opts.get("hiera", [])
    if opts:
        cmd += ["--opts", *opts]
    step = runner.run("inference", cmd, cfg.limits["inference"])
    step["results"] = json.loads(results.read_text()) if results.is_file() else []
    return step


def mae(runner: Runner, cfg: Settings, work: Path) -> dict:
    """Step 4: tools/benchmark_mae.py, ours vs official, AMP."""
    results = work / "mae.json"
    results.unlink(missing_ok=True)
    cmd = [sys.executable, "tools/benchmark_mae.py", "--size", cfg.mae_size]
    cmd += ["--batch", str(cfg.mae_batch), "--steps", str(cfg.mae_steps)]
    cmd += ["--warmup", str(cfg.mae_warmup), "--json", str(results)]
    cmd += ["--amp", cfg.mae_amp] if cfg.mae_amp else []
    step = runner.run("mae", cmd, cfg.limits["mae"])
    step["results"] = json.loads(results.read_text()) if results.is_file() else {}
    return step


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".2f", none: str = "—") -> str:
    return none if value is None else format(value, spec)


def report_steps(steps: list[dict], cfg: Settings) -> list[str]:
    lines = ["| step | status | seconds | limit |", "|---|---|---|---|"]
    for s in steps:
        limit = cfg.limits.get(s["name"], "")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {limit} |")
    return lines


def report_tests(step: dict | None) -> list[str]:
    if step is None:
        return ["not run"]
    summary = [ln for ln in step["tail"].splitlines() if re.search(r"passed|failed|skipped", ln)]
    lines = [f"Status: {step['status']}. Summary: `{summary[-1].strip('= ') if summary else '?'}`"]
    problems = [ln for ln in step["tail"].splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if problems:
        lines += ["", "```", *problems, "```"]
    return lines


def report_training(steps: list[dict], cfg: Settings) -> list[str]:
    lines = [
        "train_net.py (AMP: Detectron2's AMPTrainer, fp16; train_net.py trains in fp32 where "
        f"there is no CUDA), random init, synthetic shapes at "
        f"{cfg.image_size} px ({cfg.num_train} images, LSJ), batch {cfg.train_batch}, "
        f"{cfg.train_iters} iterations. s/iter: Detectron2's 'Overall training speed' (all "
        "iterations but the first few); last: its median of the last 20; memory: its max_mem "
        "(torch.cuda.max_memory_allocated).",
        "",
        "| model | status | precision | iterations | s/iter | last s/iter (data) | max memory MB | "
        "loss first → last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        data_time = _fmt(s.get("last_data_time"), ".3f")
        lines.append(
            f"| {s['model']} (`{s['config']}`) | {s['status']} | {s.get('precision')} | "
            f"{s.get('iters_done', 0)} | "
            f"{_fmt(s.get('s_per_iter'), '.3f')} | {_fmt(s.get('last_time'), '.3f')} "
            f"({data_time}) | {_fmt(s.get('max_mem_MB'), '.0f')} | "
            f"{_fmt(s.get('first_loss'))} → {_fmt(s.get('last_loss'))} |"
        )
    if len(steps) == 2 and all(s.get("s_per_iter") for s in steps):
        hiera, vitdet = steps
        ratio = f"Hiera-B / ViTDet-B: s/iter **{hiera['s_per_iter'] / vitdet['s_per_iter']:.2f}×**"
        if hiera.get("max_mem_MB") and vitdet.get("max_mem_MB"):
            ratio += f", memory **{hiera['max_mem_MB'] / vitdet['max_mem_MB']:.2f}×**"
        lines += ["", ratio]
    return lines


def report_inference(step: dict | None, cfg: Settings) -> list[str]:
    if step is None:
        return ["not run"]
    rows = {(r["model"], r["dtype"]): r for r in step.get("results", [])}
    head = "| model | family | params | **paper** ms (V100 fp32) | **paper** ratio |"
    rule = "|---|---|---|---|---|"
    for dtype in cfg.dtypes:
        head += f" {dtype} ms | ratio | {dtype} peak MB |"
        rule += "---|---|---|"
    lines = [
        f"tools/benchmark.py: Mask R-CNN inference, {cfg.image_size}×{cfg.image_size}, batch 1, "
        f"random weights, box score threshold 0 (100 detections through the mask head), median "
        f"of {cfg.bench_iters} after {cfg.bench_warmup} warm-up, every iteration synchronised; "
        "fp32 with PyTorch's TF32 defaults (see the JSON); ratios to Hiera-B (L: to Hiera-L).",
        "",
        head,
        rule,
    ]
    names = {name: (spec, family) for name, spec, family in cfg.inference_models}
    for name, (spec, family) in names.items():
        base = FAMILY_BASE[family]
        paper = TABLE10_MS[name] / TABLE10_MS[base]
        first = rows.get((spec, cfg.dtypes[0]))
        params = f"{first['params_M']:.1f}M" if first else "—"
        line = f"| {name} (`{spec}`) | {family} | {params} | {TABLE10_MS[name]} | {paper:.2f} |"
        for dtype in cfg.dtypes:
            r, b = rows.get((spec, dtype)), rows.get((names[base][0], dtype))
            ratio = r["median_s"] / b["median_s"] if r and b else None
            ms = r["median_s"] * 1000 if r else None
            peak = r["peak_mem_MB"] if r else None
            line += f" {_fmt(ms, '.1f')} | {_fmt(ratio)} | {_fmt(peak, '.0f')} |"
        lines.append(line)
    return lines


def report_mae(step: dict | None) -> list[str]:
    if step is None or not step.get("results"):
        return ["not run" if step is None else f"no results ({step['status']})"]
    r = step["results"]
    lines = [
        f"tools/benchmark_mae.py: Hiera-{r['size']} MAE, 224 px, batch {r['batch']}, mask ratio "
        f"{r['mask_ratio']}, {r['amp']} autocast, forward + backward + AdamW, median of "
        f"{r['steps']} steps after {r['warmup']}; memory: the largest growth of allocated memory "
        "in a step over the resting state (all variants' weights and optimizer states).",
        "",
        "| variant | ms/step | images/s | step memory MB | last loss |",
        "|---|---|---|---|---|",
    ]
    for name, v in r["variants"].items():
        lines.append(
            f"| {name} | {v['median_s'] * 1000:.1f} | {v['images_per_s']:.1f} | "
            f"{_fmt(v.get('growth_MB'), '.0f')} | {v['last_loss']:.4f} |"
        )
    lines.append("")
    for key, text in (
        ("ours_over_official_throughput", "ours / official throughput"),
        ("ours_over_official_memory", "ours / official step memory"),
        ("sparse_over_dense_throughput", "sparse / dense-encoder throughput"),
    ):
        if key in r:
            lines.append(f"- {text}: **{r[key]:.2f}×**")
    return lines


def write_report(path: Path, args, cfg: Settings, env: dict, runner: Runner, found: dict) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "CPU smoke run (tiny sizes; not a measurement)" if args.cpu_smoke else "GPU run"
    lines = [
        f"# hiera_det GPU check: {mode}",
        "",
        f"{now}; command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "nvidia-smi"),
    ]
    if env.get("nvidia-smi"):
        lines.append(f"nvidia-smi (name, driver, memory, SM clock/max, power, °C): "
                     f"{env['nvidia-smi']}")  # fmt: skip
    sections = [
        ("Steps", report_steps(runner.steps, cfg)),
        ("1. CUDA tests (`pytest -m cuda tests/test_cuda.py`)", report_tests(found.get("tests"))),
        ("2. Training with AMP", report_training(found.get("train", []), cfg)),
        ("3. Inference latency", report_inference(found.get("inference"), cfg)),
        ("4. MAE pretraining step", report_mae(found.get("mae"))),
    ]
    for title, body in sections:
        lines += ["", f"## {title}", "", *body]
    lines += ["", "Full output: gpu_check.log; every number: results.json."]
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for report.md, log, JSON")
    parser.add_argument(
        "--wheels", help="folder of carried wheels to install (tools/gpu_wheels.sh)"
    )
    parser.add_argument("--work", default="/tmp/hiera_det_gpu_check", help="scratch folder")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, on the CPU")
    parser.add_argument("--train-iters", type=int, default=100)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--mae-batch", type=int, default=64)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["tests", "train", "inference", "mae"]
    )
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="STEP=SECONDS",
        help=f"time limit of one step (defaults: {STEP_LIMITS}); may be repeated",
    )
    parser.add_argument(
        "--time-limit", type=float, help="seconds for the whole run: a late step is cut short"
    )
    args = parser.parse_args(argv)
    try:
        cfg = smoke_settings(args) if args.cpu_smoke else real_settings(args)
    except ValueError as e:
        parser.error(str(e))
    output, work = Path(args.output), Path(args.work)
    output.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    if args.cpu_smoke:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    deadline = time.monotonic() + (args.time_limit or float("inf"))
    log_file = output / "gpu_check.log"
    log_file.write_text("")
    runner = Runner(log_file, env, deadline)
    found: dict = {}
    if args.wheels:
        found["install"] = install_wheels(Path(args.wheels), site, runner, cfg.limits["install"])
        if found["install"] not in runner.steps:
            runner.steps.append(found["install"])
    env_info = environment(runner)
    if "train" in args.skip:
        if "tests" not in args.skip:
            runner.run("tests", pytest_command(), cfg.limits["tests"])
    else:
        data = run_tests_and_draw_data(runner, cfg, work, tests="tests" not in args.skip)
        found["train"] = [train(runner, cfg, work, data, n, c) for n, c in TRAIN_MODELS]
    found["tests"] = next((s for s in runner.steps if s["name"] == "tests"), None)
    if "inference" not in args.skip:
        found["inference"] = inference(runner, cfg, work)
    if "mae" not in args.skip:
        found["mae"] = mae(runner, cfg, work)
    write_report(output / "report.md", args, cfg, env_info, runner, found)
    (output / "results.json").write_text(
        json.dumps({"environment": env_info, "steps": runner.steps}, indent=1, default=str)
    )
    runner.log((output / "report.md").read_text())
    return 0 if all(s["status"].startswith("ok") for s in runner.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
