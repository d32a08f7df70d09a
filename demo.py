#!/usr/bin/env python
"""Draw a trained detector's predictions (boxes, masks, classes, scores) on images.

    python demo.py --config-file configs/quickstart.py --input photo.jpg more_photos/ \\
        --output output/demo --opts train.init_checkpoint=output/quickstart/model_final.pth

`--input` takes image files and folders (searched recursively); each drawing is written under
`--output` with the input's name (keeping sub-folders of an input folder). The model is the
config's, run by `hiera_det.predictor.RobustPredictor` (Detectron2's `DefaultPredictor` for any
image mode: gray, palette, RGBA, 16-bit), with the weights named by ``train.init_checkpoint`` (or
`--weights`). With ``--onnx DIR/model.onnx`` it is that file (written by tools/export_model.py)
run by ONNX Runtime (`hiera_det.export.OnnxPredictor`); the config is then the one it was exported
from (e.g. ``DIR/config.yaml``). Class names come from the config's test dataset. An unreadable
image is reported by path and skipped; the run then exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.utils.logger import setup_logger
from omegaconf import OmegaConf
from tqdm import tqdm

from hiera_det.checkpoint_download import CorruptCheckpointError
from hiera_det.config_check import ConfigOverrideError, load_config
from hiera_det.data.images import BadImageError, list_images, read_image_any
from hiera_det.engine.visualize import draw_predictions
from hiera_det.export import OnnxModelError, OnnxPredictor
from hiera_det.predictor import (
    RobustPredictor,
    predictor_cfg,
    read_test_datasets,
    score_thresh_overrides,
)

logger = logging.getLogger("demo")


class DemoError(Exception):
    """A problem with the demo's inputs, reported without a traceback."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, help="a LazyConfig (.py or config.yaml)")
    parser.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--output", required=True, help="folder for the drawings")
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="draw detections scoring >= this"
    )
    parser.add_argument("--weights", help="detector checkpoint (default: train.init_checkpoint)")
    parser.add_argument(
        "--onnx", help="run this model.onnx (tools/export_model.py) with ONNX Runtime instead"
    )
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides key=value ..."
    )
    return parser


def find_images(inputs: Sequence[str]) -> list[tuple[Path, Path]]:
    """``(image path, output path relative to --output)`` for every input file and every image
    in the input folders (`list_images`: recursive, sorted). Raises naming a missing input or an
    empty folder.
    """
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            try:
                files = list_images(str(item))
            except FileNotFoundError as e:  # no images in the folder
                raise DemoError(str(e)) from e
            root = os.path.abspath(item)
            found += [(Path(p), Path(os.path.relpath(p, root))) for p in files]
        elif item.is_file():
            found.append((item, Path(item.name)))
        else:
            raise FileNotFoundError(f"input not found: {item}")
    return found


def output_path(output_dir: Path, relative: Path) -> Path:
    """Keep the input's name; PNG when OpenCV cannot write the input's format."""
    path = output_dir / relative
    if not cv2.haveImageWriter(str(path)):
        path = path.with_suffix(path.suffix + ".png")
    return path


def build_onnx_predictor(args) -> tuple[OnnxPredictor, Metadata]:
    if args.weights:
        raise DemoError("--weights does not apply to --onnx: the ONNX file holds the weights")
    predictor = OnnxPredictor(args.config_file, args.onnx, args.opts)
    lazy = load_config(args.config_file, args.opts)
    keys = [override.split("=")[0] for override in score_thresh_overrides(lazy, 0.0)]
    thresholds = [t for t in (OmegaConf.select(lazy, key) for key in keys) if t is not None]
    if thresholds and args.confidence_threshold < min(thresholds):
        logger.warning(
            f"the ONNX graph keeps detections scoring >= {min(thresholds)} ({keys[0]} at "
            f"export); --confidence-threshold {args.confidence_threshold} cannot show lower ones"
        )
    names = read_test_datasets(lazy)
    return predictor, MetadataCatalog.get(names[0]) if names else Metadata()


def build_predictor(args) -> tuple[RobustPredictor | OnnxPredictor, Metadata]:
    if args.onnx:
        return build_onnx_predictor(args)
    opts = list(args.opts)
    lazy = load_config(args.config_file, opts)  # fails on unknown keys and wrong types
    weights = args.weights or lazy.train.get("init_checkpoint", "")
    if not weights:
        raise DemoError(
            "no weights: give --weights PATH or --opts train.init_checkpoint=PATH "
            "(e.g. output/quickstart/model_final.pth)"
        )
    # Let the model keep low-scoring detections when the threshold is below its default.
    opts += score_thresh_overrides(lazy, args.confidence_threshold)
    hint = (
        "--weights /path/to/file" if args.weights else "--opts train.init_checkpoint=/path/to/file"
    )
    cfg = predictor_cfg(args.config_file, weights, opts, local_hint=hint)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else Metadata()
    return RobustPredictor(cfg), metadata


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the demo; returns the written files. Raises if an input could not be read."""
    args = get_parser().parse_args(argv)
    setup_logger(name="detectron2")
    setup_logger(name="demo")
    images = find_images(args.input)
    predictor, metadata = build_predictor(args)
    output_dir = Path(args.output)

    written, failed = [], []
    for path, relative in tqdm(images, desc="demo", unit="img", disable=len(images) < 2):
        try:
            image = read_image_any(str(path), "BGR")
        except BadImageError as e:
            logger.warning(f"skipping {path}: {e}")
            failed.append(path)
            continue
        instances = predictor(image)["instances"]
        drawing = draw_predictions(
            np.ascontiguousarray(image[:, :, ::-1]),
            instances,
            metadata,
            score_threshold=args.confidence_threshold,
        )
        out = output_path(output_dir, relative)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out), drawing[:, :, ::-1]):
            raise OSError(f"could not write {out}")
        kept = int((instances.scores >= args.confidence_threshold).sum())
        logger.info(f"{path}: {kept} detections -> {out}")
        written.append(out)
    if failed:
        names = ", ".join(map(str, failed[:5])) + (" ..." if len(failed) > 5 else "")
        raise DemoError(f"{len(failed)} of {len(images)} inputs could not be read: {names}")
    logger.info(f"{len(written)} drawings written to {output_dir}")
    return written


if __name__ == "__main__":
    try:
        main()
    except (
        DemoError,
        FileNotFoundError,  # also CheckpointUnavailableError: a URL that cannot be downloaded
        ConfigOverrideError,
        CorruptCheckpointError,
        OnnxModelError,
    ) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(1)
