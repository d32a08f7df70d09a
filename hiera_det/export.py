"""Export a detector to ONNX and run it with ONNX Runtime, without Detectron2's model.

    python tools/export_model.py --config-file configs/mask_rcnn_hiera_b.py --output out/onnx \\
        train.init_checkpoint=output/model_final.pth

    from hiera_det.export import OnnxPredictor
    predictor = OnnxPredictor("configs/mask_rcnn_hiera_b.py", "out/onnx/model.onnx")
    instances = predictor(bgr_image)["instances"]  # as DefaultPredictor(predictor_cfg(...))

The graph is Detectron2's `GeneralizedRCNN.inference(..., do_postprocess=False)` traced through
Detectron2's `TracingAdapter` and exported by `torch.onnx.export` (the TorchScript exporter). It
takes one resized image and returns the detections at that size; what happens before and after
it (the test resize, pasting masks into the full image) is done by `OnnxPredictor` with the same
Detectron2 functions `DefaultPredictor` uses. docs/export.md lists what is inside the graph.

The model config (``cfg.model``, as canonical JSON) is stored in the ONNX file's metadata, so that
`OnnxPredictor` refuses a file exported from another config instead of returning wrong boxes.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from hiera_det.config_check import load_config
from hiera_det.predictor import read_test_resize

__all__ = [
    "BOX_TOLERANCE",
    "ONNX_OPSET",
    "OUTPUT_NAMES",
    "OnnxModelError",
    "OnnxPredictor",
    "SCORE_TOLERANCE",
    "build_test_resize",
    "canonical_model_config",
    "export_onnx",
    "match_detections",
    "preprocess_image",
    "tracing_adapter",
]

# Detectron2's `STABLE_ONNX_OPSET_VERSION` is 11, but its RoIAlign is `aligned=True` (ROIAlignV2),
# which ONNX expresses only from opset 16 (`coordinate_transformation_mode="half_pixel"`;
# torchvision's exporter refuses aligned RoIAlign below 16). 17 adds LayerNormalization, the op
# of every norm in Hiera, the FPN and the heads.
ONNX_OPSET = 17
# Graph outputs, in this order (the fields of Detectron2's `Instances` before postprocessing).
OUTPUT_NAMES = ("boxes", "scores", "classes", "mask_probs")
INPUT_NAME = "image"
# Two runs of the graph give the same detection when its boxes and scores are this close.
BOX_TOLERANCE, SCORE_TOLERANCE = 1e-2, 1e-4
_META_PREFIX = "hiera_det."


def match_detections(
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    box_tol: float = BOX_TOLERANCE,
    score_tol: float = SCORE_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray]:
    """The detections of `a` and `b` that are the same detection (same class, scores within
    `score_tol`, every box coordinate within `box_tol`): their indices ``(in_a, in_b)``, pair by
    pair (int64 arrays of equal length).

    `a` and `b` hold "boxes" ``[N, 4]``, "scores" and "classes" (`OUTPUT_NAMES`). Two runtimes
    order detections whose scores differ by less than their rounding either way, so the match is
    by value, not position: greedy, `a`'s highest score first, each detection of `b` used once.
    """
    used = np.zeros(len(b["scores"]), dtype=bool)
    in_a, in_b = [], []
    for i in np.argsort(-np.asarray(a["scores"]), kind="stable"):
        same = (
            ~used
            & (np.asarray(b["classes"]) == a["classes"][i])
            & (np.abs(np.asarray(b["scores"]) - a["scores"][i]) <= score_tol)
            & (np.abs(np.asarray(b["boxes"]) - a["boxes"][i]).max(axis=1, initial=0) <= box_tol)
        )
        if same.any():
            j = int(np.argmax(same))
            used[j] = True
            in_a.append(i)
            in_b.append(j)
    return np.asarray(in_a, dtype=np.int64), np.asarray(in_b, dtype=np.int64)


class OnnxModelError(ValueError):
    """An ONNX file that cannot be used with the given config (or is not one of ours)."""


def _object_name(value, key: str) -> str:
    """A class or function by its full name, ``module.qualname``."""
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not module or not qualname:
        raise OnnxModelError(f"config value {key}={value!r} cannot be recorded in an ONNX file")
    return f"{module}.{qualname}"


def _target_name(target, key: str) -> str:
    """The full name of a ``_target_``: a class or function in a .py config, its (possibly
    shortened) dotted name in the config.yaml that `LazyConfig.save` writes from it. Both name
    the same object, so a .py config and its config.yaml give the same JSON."""
    if isinstance(target, str):
        try:
            target = locate(target)
        except Exception as e:  # locate raises ImportError or whatever the import raised
            raise OnnxModelError(
                f"config value {key}={target!r} names nothing importable: {e}"
            ) from None
    return _object_name(target, key)


def _jsonable(value, key: str):
    if isinstance(value, functools.partial):
        return {
            "partial": _object_name(value.func, key),
            "args": [_jsonable(v, key) for v in value.args],
            "keywords": {k: _jsonable(v, f"{key}.{k}") for k, v in value.keywords.items()},
        }
    if isinstance(value, Mapping):
        return {
            str(k): _target_name(v, f"{key}.{k}") if k == "_target_" else _jsonable(v, f"{key}.{k}")
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{key}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(value):
        return _object_name(value, key)
    raise OnnxModelError(f"config value {key}={value!r} cannot be recorded in an ONNX file")


def canonical_model_config(cfg) -> dict:
    """``cfg.model`` as plain JSON data: interpolations resolved, classes and functions by their
    full name (``module.qualname``; a ``_target_`` string is resolved first).

    Equal for a .py config and the config.yaml that `LazyConfig.save` writes from it.
    """
    model = cfg.model
    if isinstance(model, (DictConfig, ListConfig)):
        model = OmegaConf.to_container(model, resolve=True)
    return _jsonable(model, "model")


def _flatten(data, prefix: str = "model") -> dict[str, object]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out or {prefix: {}}
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: data}


def _config_differences(exported: dict, given: dict, limit: int = 8) -> list[str]:
    """``key: exported -> given`` for every leaf that differs (at most `limit`, then a count)."""
    a, b = _flatten(exported), _flatten(given)
    missing = object()
    lines = [
        f"{k}: {a.get(k, '(absent)')!r} in the ONNX file, {b.get(k, '(absent)')!r} in the config"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
    return lines


def build_test_resize(cfg, config_file: str) -> T.ResizeShortestEdge:
    """`DefaultPredictor`'s resize, as `predictor_cfg` configures it from the LazyConfig."""
    short, longest = read_test_resize(cfg, config_file)
    return T.ResizeShortestEdge([short, short], longest or 1_000_000)


def preprocess_image(
    bgr_image: np.ndarray, resize: T.ResizeShortestEdge, input_format: str
) -> np.ndarray:
    """What `DefaultPredictor.__call__` gives the model: the image in the model's channel order,
    resized by the test resize, as float32 ``[3, h, w]``. Raises naming a wrong dtype or shape."""
    if not isinstance(bgr_image, np.ndarray):
        raise TypeError(
            f"expected a numpy array (H, W, 3) BGR uint8, got {type(bgr_image).__name__}"
        )
    if bgr_image.dtype != np.uint8:
        raise TypeError(
            f"expected a BGR image of dtype uint8 (as cv2.imread returns), got dtype "
            f"{bgr_image.dtype}; convert it, e.g. np.clip(image, 0, 255).astype(np.uint8)"
        )
    if bgr_image.ndim != 3 or bgr_image.shape[2] != 3 or min(bgr_image.shape[:2]) < 1:
        raise ValueError(f"expected a BGR image of shape (H, W, 3), got {bgr_image.shape}")
    image = bgr_image[:, :, ::-1] if input_format == "RGB" else bgr_image
    image = resize.get_transform(image).apply_image(image)
    return np.ascontiguousarray(image.astype("float32").transpose(2, 0, 1))


def tracing_adapter(model: nn.Module, image: torch.Tensor):
    """Detectron2's `TracingAdapter` around `model.inference` without postprocessing: one float
    ``[3, h, w]`` image in (any h, w up to the square), the `OUTPUT_NAMES` tensors out."""
    from detectron2.export import TracingAdapter

    def inference(model, inputs):
        instances = model.inference(inputs, do_postprocess=False)[0]
        if not instances.has("pred_masks"):
            raise OnnxModelError("the model has no mask head: only Mask R-CNN models are exported")
        fields = (instances.pred_boxes.tensor, instances.scores, instances.pred_classes)
        return (*fields, instances.pred_masks)

    return TracingAdapter(model.eval(), [{"image": image}], inference).eval()


def _square_size(model: nn.Module) -> int:
    """The side of the square every image is padded to inside the model (the config's
    ``model.backbone.square_pad``). Raises if there is none: the graph needs a fixed square."""
    size = getattr(model.backbone, "padding_constraints", {}).get("square_size", 0)
    if not size:
        raise OnnxModelError(
            "the backbone pads to no fixed square (model.backbone.square_pad is 0): the exported "
            "graph needs one, e.g. model.backbone.square_pad=1024"
        )
    return int(size)


def export_onnx(model: nn.Module, cfg, image: torch.Tensor, path: str, **metadata: str) -> None:
    """Trace `model` on `image` (float ``[3, h, w]``, as `preprocess_image` returns) and write the
    ONNX graph to `path`, with ``cfg.model`` and `metadata` in the file's metadata."""
    import onnx

    side = _square_size(model)
    adapter = tracing_adapter(model, image)
    torch.onnx.export(
        adapter,
        (image,),
        path,
        # The TorchScript exporter: it traces through Detectron2's data-dependent NMS / RoI code,
        # which Detectron2 keeps traceable (TracingAdapter is made for it).
        dynamo=False,
        opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        # Height and width vary per image (up to the square); the graph pads them to `side`.
        dynamic_axes={INPUT_NAME: {1: "height", 2: "width"}, **{n: {0: "n"} for n in OUTPUT_NAMES}},
    )
    proto = onnx.load(path, load_external_data=False)  # weights > 2 GB stay in their side files
    entries = {
        "model_config": json.dumps(canonical_model_config(cfg), sort_keys=True),
        "input_format": cfg.model.get("input_format", "BGR"),
        "square_size": str(side),
        **metadata,
    }
    for key, value in entries.items():
        proto.metadata_props.add(key=_META_PREFIX + key, value=str(value))
    onnx.save(proto, path)


class OnnxPredictor:
    """Detectron2's `DefaultPredictor` for an exported detector, run by ONNX Runtime on the CPU.

    Args:
        config_file: the LazyConfig the model was exported from (``.py`` + `opts`, or the
            ``config.yaml`` saved by train_net.py), as `hiera_det.predictor.predictor_cfg`
            takes it; its test resize and input format are used, and its model config must equal
            the one recorded in the ONNX file.
        onnx_path: the ``model.onnx`` written by tools/export_model.py.
        opts: LazyConfig overrides, ``["key=value", ...]`` (checked by `load_config`).
        num_threads: ONNX Runtime's intra-op threads (default: its own choice, the core count).

    ``predictor(bgr_image)`` takes a BGR ``uint8`` ``[H, W, 3]`` image of any size and returns
    ``{"instances": Instances}`` at that size: ``pred_boxes``, ``scores``, ``pred_classes`` and
    ``pred_masks`` (bool ``[N, H, W]``), as `DefaultPredictor` does.

    Raises:
        FileNotFoundError: no config file or ONNX file.
        OnnxModelError: the file is not an ONNX model exported by tools/export_model.py, or it was
            exported from a different model config (the differing keys are named).
    """

    def __init__(
        self,
        config_file: str,
        onnx_path: str,
        opts: Sequence[str] = (),
        *,
        num_threads: int | None = None,
    ):
        import onnxruntime as ort

        cfg = load_config(config_file, opts)
        if not os.path.isfile(onnx_path):
            raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        try:
            self.session = ort.InferenceSession(
                onnx_path, options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf types
            raise OnnxModelError(f"cannot load {onnx_path} as an ONNX model: {e}") from None
        self.metadata = self._read_metadata(onnx_path)
        exported = json.loads(self.metadata["model_config"])
        given = canonical_model_config(cfg)
        if exported != given:
            differences = "\n  ".join(_config_differences(exported, given))
            raise OnnxModelError(
                f"{onnx_path} was exported from another model config than {config_file} "
                f"(exported from {self.metadata.get('config_file', '?')}); differences:\n  "
                f"{differences}\nExport it again with tools/export_model.py, or give the config "
                "it was exported from."
            )
        self.resize = build_test_resize(cfg, config_file)
        self.input_format = cfg.model.get("input_format", "BGR")
        self.square_size = int(self.metadata["square_size"])
        self.onnx_path = onnx_path

    def _read_metadata(self, onnx_path: str) -> dict[str, str]:
        found = self.session.get_modelmeta().custom_metadata_map
        metadata = {
            k[len(_META_PREFIX) :]: v for k, v in found.items() if k.startswith(_META_PREFIX)
        }
        outputs = [o.name for o in self.session.get_outputs()]
        if "model_config" not in metadata or outputs != list(OUTPUT_NAMES):
            raise OnnxModelError(
                f"{onnx_path} is not a detector exported by tools/export_model.py (outputs "
                f"{outputs}, expected {list(OUTPUT_NAMES)}; hiera_det metadata: "
                f"{sorted(metadata) or 'none'})"
            )
        return metadata

    def run_graph(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs (`OUTPUT_NAMES`) for one float ``[3, h, w]`` resized image."""
        h, w = image.shape[1:]
        if max(h, w) > self.square_size:
            raise ValueError(
                f"a {h}x{w} input does not fit the graph's {self.square_size} square: the "
                "config's test resize (dataloader.test.mapper.augmentations) must cap the longest "
                f"edge at {self.square_size}"
            )
        return dict(zip(OUTPUT_NAMES, self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: image})))

    def __call__(self, bgr_image: np.ndarray) -> dict[str, Instances]:
        image = preprocess_image(bgr_image, self.resize, self.input_format)
        outputs = {k: torch.from_numpy(v) for k, v in self.run_graph(image).items()}
        instances = Instances(tuple(image.shape[1:]))
        instances.pred_boxes = Boxes(outputs["boxes"])
        instances.scores = outputs["scores"]
        instances.pred_classes = outputs["classes"]
        instances.pred_masks = outputs["mask_probs"]
        height, width = bgr_image.shape[:2]
        # GeneralizedRCNN._postprocess: scale the boxes back and paste the masks (threshold 0.5).
        return {"instances": detector_postprocess(instances, height, width)}
