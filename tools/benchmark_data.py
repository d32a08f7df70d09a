#!/usr/bin/env python
"""The dataset checks before training against Detectron2's own load of the same COCO file.

    python tools/benchmark_data.py --images 118287 --output /tmp/coco_like    # COCO-sized
    python tools/benchmark_data.py --images 2000 --output /tmp/small

Makes a COCO-like instances file (``--images`` images with empty files present, about
``--annotations-per-image`` polygon annotations each, ``--crowd`` of them crowd RLEs,
``--categories`` categories; written once per size into `--output`), then measures, each in a
fresh process (wall time and peak resident memory of that process):

1. Detectron2's `load_coco_json` (what training needs anyway);
2. `hiera_det.data.validation.validate_coco_json(check_files=True)` (the checks of the file), with
   an empty verdict folder;
3. the same again: the verdict kept by step 2 (a resumed, requeued or restarted run);
4. train_net's start-up on the file: `register_coco_format` + `validate_datasets` +
   `DatasetCatalog.get` (Detectron2's load), with an empty verdict folder;
5. the same again, with the verdict step 4 kept;

and prints them as a Markdown table with the ratios to step 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STEPS = {  # row name -> (what the fresh process runs, verdict folder)
    "Detectron2's `load_coco_json`": ("load", "unused"),
    "`validate_coco_json(check_files=True)`, first run": ("validate", "checks"),
    "`validate_coco_json`, verdict kept": ("validate", "checks"),
    "start-up: register + `validate_datasets` + `DatasetCatalog.get`, first run": (
        "startup",
        "startup",
    ),
    "start-up, verdict kept": ("startup", "startup"),
}


def _polygon(rng: np.random.Generator, width: int, height: int) -> list[float]:
    """A random convex-ish polygon of 8-24 points inside the image."""
    n = int(rng.integers(8, 25))
    cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
    radius = rng.uniform(5, 0.1 * min(width, height) + 5)
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    xs = np.clip(cx + radius * np.cos(angles), 0, width - 1)
    ys = np.clip(cy + radius * np.sin(angles), 0, height - 1)
    return [round(float(v), 2) for pair in zip(xs, ys) for v in pair]


def _annotation(rng, ann_id: int, image_id: int, width: int, height: int, crowd: bool, cats: int):
    category = int(rng.integers(1, cats + 1))
    if crowd:
        h, w = height, width
        counts = [h * w // 2, h * w - h * w // 2]  # a valid uncompressed RLE of the image size
        segmentation = {"size": [h, w], "counts": counts}
        bbox = [0.0, 0.0, float(w // 2), float(h)]
    else:
        polygon = _polygon(rng, width, height)
        xs, ys = polygon[0::2], polygon[1::2]
        bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        segmentation = [polygon]
    return {
        "id": ann_id, "image_id": image_id, "category_id": category, "iscrowd": int(crowd),
        "bbox": [round(v, 2) for v in bbox], "area": float(bbox[2] * bbox[3]),
        "segmentation": segmentation,
    }  # fmt: skip


def make_coco_like(folder: Path, images: int, per_image: float, crowd: float, cats: int) -> Path:
    """Write ``folder/instances.json`` and the (empty) image files, unless already there."""
    json_file = folder / f"instances_{images}.json"
    image_root = folder / "images"
    if json_file.is_file():
        return json_file
    image_root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    content = {"images": [], "annotations": []}
    content["categories"] = [
        {"id": i, "name": f"c{i}", "supercategory": "s"} for i in range(1, cats + 1)
    ]
    for image_id in range(1, images + 1):
        width, height = int(rng.integers(320, 641)), int(rng.integers(240, 481))
        name = f"{image_id:012d}.jpg"
        (image_root / name).touch()
        content["images"].append(
            {"id": image_id, "file_name": name, "width": width, "height": height}
        )
        for _ in range(int(rng.poisson(per_image))):
            ann_id = len(content["annotations"]) + 1
            is_crowd = bool(rng.random() < crowd)
            content["annotations"].append(
                _annotation(rng, ann_id, image_id, width, height, is_crowd, cats)
            )
    tmp = json_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, json_file)
    return json_file


def run_step(step: str, json_file: Path, cache_dir: Path) -> dict:
    """Run `step` in this process (the child side); the time leaves out the imports, the peak
    memory includes them (the same for every step)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import load_coco_json

    from hiera_det.data.datasets import register_coco_format
    from hiera_det.data.validation import validate_coco_json, validate_datasets

    image_root = str(json_file.parent / "images")
    imports_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if step == "load":
        load_coco_json(str(json_file), image_root)
    elif step == "validate":
        validate_coco_json(str(json_file), image_root, check_files=True, cache_dir=str(cache_dir))
    else:
        register_coco_format("benchmark", str(json_file), image_root, cache_dir=str(cache_dir))
        validate_datasets("benchmark", cache_dir=str(cache_dir))
        DatasetCatalog.get("benchmark")
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_MB": peak_mb, "imports_MB": imports_mb}


def measure(step: str, json_file: Path, cache_dir: Path) -> dict:
    """`run_step` in a fresh process."""
    command = [sys.executable, __file__, "--child", step, str(json_file), str(cache_dir)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(results: dict[str, dict]) -> list[str]:
    base = results["Detectron2's `load_coco_json`"]
    lines = ["| step | time | vs load | peak memory | vs load |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['seconds']:.1f} s | {r['seconds'] / base['seconds']:.2f}x | "
            f"{r['peak_MB'] / 1024:.2f} GB | {r['peak_MB'] / base['peak_MB']:.2f}x |"
        )
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for the file, images and verdict")
    parser.add_argument("--images", type=int, default=118_287)
    parser.add_argument("--annotations-per-image", type=float, default=7.3)
    parser.add_argument("--crowd", type=float, default=0.01)
    parser.add_argument("--categories", type=int, default=80)
    args = parser.parse_args(argv)
    folder = Path(args.output)
    json_file = make_coco_like(
        folder, args.images, args.annotations_per_image, args.crowd, args.categories
    )
    for name in {cache for _, cache in STEPS.values()}:  # the first check finds no verdict
        shutil.rmtree(folder / "dataset_checks" / name, ignore_errors=True)
    size = json_file.stat().st_size / 2**20
    results = {
        name: measure(step, json_file, folder / "dataset_checks" / cache)
        for name, (step, cache) in STEPS.items()
    }
    lines = [f"{json_file} ({size:.0f} MB, {args.images} images), each step a fresh process:", ""]
    lines += table(results)
    imports = max(r["imports_MB"] for r in results.values()) / 1024
    lines += ["", f"Peak memory is the process's; the imports alone take {imports:.2f} GB."]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(run_step(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))))
    else:
        main()
