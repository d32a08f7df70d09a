#!/usr/bin/env python
"""Draw a trained detector's predictions (boxes, masks, classes, scores) on images or a video.

    python demo.py --config-file configs/quickstart.py --input photo.jpg more_photos/ \\
        --output output/demo --opts train.init_checkpoint=output/quickstart/model_final.pth
    python demo.py --config-file configs/quickstart.py --video-input clip.mp4 \\
        --output output/demo --output-json output/demo/predictions.json --opts ...

`--video-input` reads a video with OpenCV and writes the annotated video, ``<output>/<name>.mp4``
(same frame size and rate, every frame). `--output-json` writes every prediction scoring >=
`--confidence-threshold` as COCO results (``image_id``, ``category_id`` in the test dataset's ids,
``bbox`` XYWH, ``score``, ``segmentation`` as RLE; plus ``file_name`` and, for a video, ``frame``),
which `pycocotools.COCO.loadRes` reads: ``image_id`` is the image's position in the inputs (1, 2,
...), or the frame number (1, 2, ...) of a video.

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
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.logger import setup_logger
from omegaconf import OmegaConf
from tqdm import tqdm

from hiera_det.checkpoint_download import CorruptCheckpointError
from hiera_det.config_check import ConfigOverrideError, load_config
from hiera_det.data.datasets import apply_dataset_config
from hiera_det.data.images import BadImageError, list_images, read_image_any
from hiera_det.engine.evaluation import unmap_category_ids
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
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input", nargs="+", help="image files and/or folders")
    inputs.add_argument("--video-input", help="a video file (read with OpenCV)")
    parser.add_argument("--output", required=True, help="folder for the drawings or the video")
    parser.add_argument("--output-json", help="also write the predictions here, as COCO results")
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
    return predictor, test_metadata(lazy)


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
    return RobustPredictor(cfg), test_metadata(lazy)


def test_metadata(lazy) -> Metadata:
    """The config's test dataset's metadata with its class names and category ids: a dataset of
    one's own (``dataset.test=[name,json,images]``, as train_net.py saves it in config.yaml) is
    registered (not its training json: prediction needs none), and read when Detectron2 has not
    read it yet (which sets them)."""
    apply_dataset_config(lazy, splits=("test",))
    names = read_test_datasets(lazy)
    if not names:
        return Metadata()
    metadata = MetadataCatalog.get(names[0])
    if metadata.get("json_file") and metadata.get("thing_dataset_id_to_contiguous_id") is None:
        DatasetCatalog.get(names[0])
    return metadata


class Annotator:
    """Runs the predictor on one BGR image: the drawing (BGR), and the image's COCO results."""

    def __init__(self, predictor, metadata: Metadata, threshold: float) -> None:
        self.predictor, self.metadata, self.threshold = predictor, metadata, threshold

    def __call__(self, image: np.ndarray, image_id: int, **about) -> tuple[np.ndarray, list]:
        instances = self.predictor(image)["instances"]
        drawing = draw_predictions(
            np.ascontiguousarray(image[:, :, ::-1]),
            instances,
            self.metadata,
            score_threshold=self.threshold,
        )
        kept = instances[instances.scores >= self.threshold].to("cpu")
        results = instances_to_coco_json(kept, image_id)
        unmap_category_ids(results, self.metadata)
        for result in results:
            result.update(about)
        return np.ascontiguousarray(drawing[:, :, ::-1]), results


def annotate_images(args, annotate: Annotator) -> tuple[list[Path], list]:
    """Each image of `--input` drawn into `--output`; returns the drawings and the results.
    Raises, after the others are done, if an input could not be read."""
    images = find_images(args.input)
    output_dir = Path(args.output)
    written, failed, results = [], [], []
    progress = tqdm(images, desc="demo", unit="img", disable=len(images) < 2)
    for image_id, (path, relative) in enumerate(progress, start=1):
        try:
            image = read_image_any(str(path), "BGR")
        except BadImageError as e:
            logger.warning(f"skipping {path}: {e}")
            failed.append(path)
            continue
        drawing, found = annotate(image, image_id, file_name=str(path))
        out = output_path(output_dir, relative)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(out), drawing):
            raise OSError(f"could not write {out}")
        logger.info(f"{path}: {len(found)} detections -> {out}")
        written.append(out)
        results += found
    if failed:
        names = ", ".join(map(str, failed[:5])) + (" ..." if len(failed) > 5 else "")
        raise DemoError(f"{len(failed)} of {len(images)} inputs could not be read: {names}")
    logger.info(f"{len(written)} drawings written to {output_dir}")
    return written, results


def annotate_video(args, annotate: Annotator) -> tuple[list[Path], list]:
    """Every frame of `--video-input` drawn into ``<output>/<name>.mp4`` (same size and frame
    rate); returns that file and the results."""
    video = cv2.VideoCapture(args.video_input)
    if not os.path.isfile(args.video_input) or not video.isOpened():
        raise DemoError(f"cannot read the video {args.video_input} (not found, or no OpenCV codec)")
    fps = video.get(cv2.CAP_PROP_FPS) or 30.0
    size = (int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
    out = Path(args.output) / (Path(args.video_input).stem + ".mp4")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise OSError(f"could not write {out}")
    results, frame = [], 0
    try:
        for frame in tqdm(range(1, frames + 1), desc="demo", unit="frame"):
            ok, image = video.read()
            if not ok:
                break  # the count in the header may be larger than what decodes
            drawing, found = annotate(image, frame, file_name=args.video_input, frame=frame)
            writer.write(cv2.resize(drawing, size, interpolation=cv2.INTER_AREA))  # drawn larger
            results += found
    finally:
        video.release()
        writer.release()
    logger.info(f"{args.video_input}: {frame} frames, {len(results)} detections -> {out}")
    return [out], results


def write_json(path: str, results: list) -> Path:
    """Write `results` (COCO results) to `path` atomically."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results))
    os.replace(tmp, out)
    logger.info(f"{len(results)} predictions written to {out} (COCO results)")
    return out


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the demo; returns the written files. Raises if an input could not be read."""
    args = get_parser().parse_args(argv)
    setup_logger(name="detectron2")
    setup_logger(name="demo")
    if args.input:
        find_images(args.input)  # a missing input fails before the model is built
    predictor, metadata = build_predictor(args)
    annotate = Annotator(predictor, metadata, args.confidence_threshold)
    run = annotate_video if args.video_input else annotate_images
    written, results = run(args, annotate)
    if args.output_json:
        written.append(write_json(args.output_json, results))
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
