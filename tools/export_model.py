#!/usr/bin/env python
"""Export a detector to ONNX (DIR/model.onnx) and check the file against PyTorch.

    python tools/export_model.py --config-file configs/mask_rcnn_hiera_b.py --output out/onnx \\
        [--format onnx] [--sample-image photo.jpg] train.init_checkpoint=output/model_final.pth

Overrides (``key=value``, checked by `hiera_det.config_check.load_config`) come last, after every
flag; the weights
are ``train.init_checkpoint`` (a detector checkpoint written by train_net.py; empty = random
weights, for timing only), loaded by `HieraCheckpointer`. Works with the config.yaml that
train_net.py saves next to its checkpoints.

Writes ``DIR/model.onnx`` (`hiera_det.export.export_onnx`; the model config is in its metadata),
``DIR/config.yaml`` (the config it was exported from, for `OnnxPredictor`) and ``DIR/export.json``
(versions, timings, the check). The check runs the file once with ONNX Runtime
(`hiera_det.export.OnnxPredictor`) and the PyTorch model on a sample image (`--sample-image`, or a
built-in synthetic one), prints the largest differences, and exits with status 1 if the
detections differ. What the graph holds: docs/export.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, ROOT)

from hiera_det.export import (  # noqa: E402
    BOX_TOLERANCE,
    ONNX_OPSET,
    OUTPUT_NAMES,
    SCORE_TOLERANCE,
    OnnxPredictor,
    build_test_resize,
    export_onnx,
    match_detections,
    preprocess_image,
    tracing_adapter,
)

logger = logging.getLogger("export_model")

# The check fails above these: the acceptance tolerances of the exported detector (docs/export.md).
TOLERANCES = {"boxes": BOX_TOLERANCE, "scores": SCORE_TOLERANCE, "mask_probs": 1e-3}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, help="a LazyConfig (.py or config.yaml)")
    parser.add_argument("--output", required=True, help="folder for model.onnx")
    parser.add_argument("--format", choices=["onnx"], default="onnx")
    parser.add_argument("--sample-image", help="image for the check (default: synthetic shapes)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides key=value ...")
    return parser


def sample_image(path: str | None) -> np.ndarray:
    """The check's BGR uint8 image: the file at `path`, or 480x640 synthetic shapes."""
    if path:
        from detectron2.data.detection_utils import read_image

        if not os.path.isfile(path):
            raise FileNotFoundError(f"sample image not found: {path}")
        return read_image(path, format="BGR")
    from hiera_det.data.synthetic import SyntheticSpec, draw_image

    rgb, _, _ = draw_image(SyntheticSpec(image_size=(480, 640)), np.random.default_rng(0))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def build_model(cfg) -> torch.nn.Module:
    """The config's model in eval mode with the weights of ``train.init_checkpoint``."""
    from detectron2.config import instantiate

    from hiera_det.checkpoint import HieraCheckpointer

    torch.manual_seed(0)  # random weights (no checkpoint) are the same in every export
    model = instantiate(cfg.model).eval()
    weights = cfg.train.get("init_checkpoint", "") if "train" in cfg else ""
    if weights:
        HieraCheckpointer(model).load(weights)
    else:
        logger.warning(
            "train.init_checkpoint is empty: exporting randomly initialised weights "
            "(fine for timing, useless for predictions)"
        )
    return model


def compare(torch_outputs: Sequence[torch.Tensor], onnx_outputs: dict[str, np.ndarray]) -> dict:
    """Detection counts, how many are the same detection in both (`match_detections`: class, box
    and score within `TOLERANCES`) and the largest |difference| per output over those pairs."""
    ours = dict(zip(OUTPUT_NAMES, (t.detach().numpy() for t in torch_outputs)))
    mine, theirs = match_detections(ours, onnx_outputs)
    result = {
        "detections_pytorch": len(ours["scores"]),
        "detections_onnx": len(onnx_outputs["scores"]),
        "detections_matched": len(mine),
    }
    for name in TOLERANCES:
        diff = np.abs(ours[name][mine].astype(np.float64) - onnx_outputs[name][theirs])
        result[f"max_abs_diff_{name}"] = float(diff.max()) if diff.size else 0.0
    result["agree"] = result["detections_pytorch"] == result["detections_onnx"] == len(mine) and (
        result["max_abs_diff_mask_probs"] <= TOLERANCES["mask_probs"]
    )
    return result


def describe_graph(path: str) -> str:
    """The graph's inputs, outputs and most frequent ops, for the log."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    ops = collections.Counter()

    def count(graph) -> None:  # NMS sits inside If branches (torchvision scripts batched_nms)
        for node in graph.node:
            ops[node.op_type] += 1
            for attribute in node.attribute:
                subgraphs = [attribute.g] if attribute.HasField("g") else []
                for sub in [*subgraphs, *attribute.graphs]:
                    count(sub)

    count(proto.graph)

    def shape(value) -> str:
        dims = value.type.tensor_type.shape.dim
        return "[" + ", ".join(d.dim_param or str(d.dim_value) for d in dims) + "]"

    inputs = ", ".join(f"{v.name} {shape(v)}" for v in proto.graph.input)
    outputs = ", ".join(f"{v.name} {shape(v)}" for v in proto.graph.output)
    special = {k: ops[k] for k in ("RoiAlign", "NonMaxSuppression", "TopK", "NonZero") if k in ops}
    return f"inputs {inputs}; outputs {outputs}; {sum(ops.values())} nodes, among them {special}"


def main(argv: Sequence[str] | None = None) -> dict:
    """Export and check; returns what export.json records."""
    from detectron2.config import LazyConfig
    from detectron2.utils.logger import setup_logger

    from hiera_det.config_check import load_config

    args = get_parser().parse_args(argv)
    setup_logger(name="export_model")
    cfg = load_config(args.config_file, args.opts)
    model = build_model(cfg)
    os.makedirs(args.output, exist_ok=True)
    config_path = os.path.join(args.output, "config.yaml")
    LazyConfig.save(cfg, config_path)
    onnx_path = os.path.join(args.output, "model.onnx")

    # Trace on the sample image exactly as OnnxPredictor will feed it (a config.yaml gives the
    # same resize and model config as the .py it came from).
    image = sample_image(args.sample_image)
    start = time.perf_counter()
    with torch.no_grad():
        resize = build_test_resize(cfg, args.config_file)
        input_format = cfg.model.get("input_format", "BGR")
        tensor = torch.from_numpy(preprocess_image(image, resize, input_format))
        export_onnx(
            model,
            cfg,
            tensor,
            onnx_path,
            config_file=os.path.abspath(args.config_file),
            checkpoint=cfg.train.get("init_checkpoint", "") or "(random weights)",
            opts=json.dumps(list(args.opts)),
        )
    export_s = time.perf_counter() - start
    logger.info(f"wrote {onnx_path} in {export_s:.1f} s: {describe_graph(onnx_path)}")

    start = time.perf_counter()
    predictor = OnnxPredictor(config_path, onnx_path)
    session_s = time.perf_counter() - start
    onnx_outputs = predictor.run_graph(tensor.numpy())
    with torch.no_grad():
        torch_outputs = tracing_adapter(model, tensor)(tensor)
    check = compare(torch_outputs, onnx_outputs)
    logger.info(
        f"check on a {image.shape[1]}x{image.shape[0]} sample image (graph input "
        f"{tuple(tensor.shape)}): ONNX Runtime vs PyTorch: {json.dumps(check)}"
    )
    report = {
        "config_file": os.path.abspath(args.config_file),
        "opts": list(args.opts),
        "onnx": os.path.abspath(onnx_path),
        "opset": ONNX_OPSET,
        "export_s": export_s,
        "session_s": session_s,
        "versions": _versions(),
        "check": check,
    }
    with open(os.path.join(args.output, "export.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


if __name__ == "__main__":
    from hiera_det.config_check import ConfigOverrideError
    from hiera_det.export import OnnxModelError

    try:
        report = main()
    except (ConfigOverrideError, FileNotFoundError, OnnxModelError) as e:
        print(f"export_model.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if not report["check"]["agree"]:
        print(
            "export_model.py: error: ONNX Runtime and PyTorch disagree (see above)", file=sys.stderr
        )
        sys.exit(1)
