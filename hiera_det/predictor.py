"""Prediction on images: Detectron2's `DefaultPredictor` (and other yacs-based tools) for a
LazyConfig model, and `RobustPredictor`, which also takes image files and arrays of any mode.

`DefaultPredictor(cfg)` takes a yacs `CfgNode` and builds the model with
``build_model(cfg)`` = ``META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)``. This module
registers one meta-architecture, ``LazyConfigModel``, that instantiates ``model`` of the LazyConfig
named in the CfgNode (so the LazyConfig stays the only definition of the model) and loads its
weights with `HieraCheckpointer`, which reads a checkpoint as data only
(`hiera_det.checkpoint.UnsafeCheckpointError`). `predictor_cfg` fills the few yacs keys the
predictor reads (device, input format, test resize) from the same LazyConfig:

    from hiera_det.predictor import RobustPredictor, predictor_cfg

    cfg = predictor_cfg("output/config.yaml", "output/model_final.pth")
    instances = RobustPredictor(cfg)("photo.jpg")["instances"]  # or a BGR array

`RobustPredictor` is `DefaultPredictor` (``DefaultPredictor(cfg)(bgr_image)`` works the same) that
reads a file of any mode (gray, palette, CMYK, RGBA, 16-bit; `hiera_det.data.images`) and turns
gray, RGBA, 16-bit or float arrays into the 8-bit BGR image `DefaultPredictor` takes.

The config may be a config file (``configs/mask_rcnn_hiera_b.py`` + `opts`) or the
``config.yaml`` that train_net.py saves next to its checkpoints (it includes the command-line
overrides, e.g. the number of classes of a custom dataset). Give it a detector checkpoint written
by train_net.py. The weights are ``LAZY_CONFIG.WEIGHTS`` and ``MODEL.WEIGHTS`` is empty:
`DefaultPredictor`'s own `DetectionCheckpointer` (which reads a ``.pkl`` with plain pickle) then
loads nothing (it logs "No checkpoint found"; the weights were loaded when the model was built).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg, instantiate
from detectron2.engine import DefaultPredictor
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .checkpoint import HieraCheckpointer
from .checkpoint_download import fetch_checkpoint
from .config_check import load_config
from .data.images import as_uint8_image, read_image_any

__all__ = [
    "LazyConfigModel",
    "RobustPredictor",
    "predictor_cfg",
    "read_test_datasets",
    "read_test_resize",
    "score_thresh_overrides",
]


@META_ARCH_REGISTRY.register()
def LazyConfigModel(cfg: CfgNode) -> nn.Module:  # noqa: N802 -- the registry key is this name
    """Build ``model`` of the LazyConfig ``cfg.LAZY_CONFIG.FILE`` with ``cfg.LAZY_CONFIG.OPTS`` and
    load ``cfg.LAZY_CONFIG.WEIGHTS`` (if any) into it with `HieraCheckpointer` (data only)."""
    model = instantiate(load_config(cfg.LAZY_CONFIG.FILE, cfg.LAZY_CONFIG.OPTS).model)
    HieraCheckpointer(model).load(cfg.LAZY_CONFIG.get("WEIGHTS", ""))
    return model


def read_test_resize(lazy, config_file: str) -> tuple[int, int]:
    """(shortest edge, longest edge cap; 0 = none) of the test loader's `ResizeShortestEdge` in
    the loaded LazyConfig `lazy` (`config_file` names it in errors); ValueError if it has none."""
    try:
        augs = lazy.dataloader.test.mapper.augmentations
    except (AttributeError, KeyError):
        augs = None
    if augs is None:
        raise ValueError(f"{config_file}: no dataloader.test.mapper.augmentations to resize with")
    for aug in augs:
        target = aug.get("_target_")
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if name.endswith("ResizeShortestEdge"):
            short = aug.short_edge_length
            if not isinstance(short, int):  # a list/range: the predictor needs one size
                short = max(short)
            return int(short), int(aug.get("max_size", 0) or 0)
    raise ValueError(
        f"{config_file}: dataloader.test.mapper.augmentations has no ResizeShortestEdge "
        f"({[a.get('_target_') for a in augs]}); DefaultPredictor can only resize that way"
    )


def read_test_datasets(lazy) -> tuple[str, ...]:
    """The names of the test loader's datasets (for their metadata, e.g. class names)."""
    names = lazy.dataloader.test.dataset.get("names", ())
    return (names,) if isinstance(names, str) else tuple(names)


def score_thresh_overrides(lazy, threshold: float) -> list[str]:
    """Overrides that set the box predictors' test score threshold (one predictor in Mask R-CNN,
    one per stage in a cascade), so that the model keeps detections down to `threshold`."""
    heads = lazy.model.roi_heads
    if "box_predictors" in heads:
        keys = [f"box_predictors.{i}" for i in range(len(heads.box_predictors))]
    else:
        keys = ["box_predictor"]
    return [f"model.roi_heads.{key}.test_score_thresh={threshold}" for key in keys]


def predictor_cfg(
    config_file: str,
    weights: str,
    opts: Sequence[str] = (),
    local_hint: str = "predictor_cfg(config_file, '/path/to/file')",
) -> CfgNode:
    """A yacs config for `DefaultPredictor` that runs the model of a LazyConfig.

    Args:
        config_file: a LazyConfig (``.py``, or the ``config.yaml`` saved by train_net.py).
        weights: a detector checkpoint (path or URL), e.g. ``output/model_final.pth``.
        opts: LazyConfig overrides, ``["key=value", ...]``, as on train_net.py's command line,
            checked by `hiera_det.config_check.load_config`.
        local_hint: how the caller's user gives a local file instead of a URL that cannot be
            downloaded (ends `CheckpointUnavailableError`'s message), e.g. ``--weights PATH``.
    Returns:
        A frozen `CfgNode`: ``MODEL.META_ARCHITECTURE="LazyConfigModel"``, ``MODEL.WEIGHTS=""``,
        ``MODEL.DEVICE`` (cuda if available), ``INPUT.FORMAT`` and ``INPUT.{MIN,MAX}_SIZE_TEST``
        from the LazyConfig's model and test loader, ``DATASETS.TEST`` (for metadata),
        ``LAZY_CONFIG.{FILE,OPTS,WEIGHTS}`` (`LazyConfigModel` builds and loads the model).
    Raises:
        FileNotFoundError: no such weights or config file; `CheckpointUnavailableError` (a
            FileNotFoundError) for a URL that cannot be downloaded and is not cached.
        CorruptCheckpointError: a truncated or corrupt weights file.
        ConfigOverrideError: an override names an unknown key or has a wrong type.
    """
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights}")
    lazy = load_config(config_file, opts)  # fails on unknown keys and wrong types
    short, longest = read_test_resize(lazy, config_file)
    # A URL is downloaded now (the error names `local_hint`), so that building the predictor
    # finds it in the cache; a truncated local file is named now, before the model is built.
    fetch_checkpoint(weights, local_hint=local_hint)

    cfg = get_cfg()
    cfg.LAZY_CONFIG = CfgNode(
        {"FILE": os.path.abspath(config_file), "OPTS": list(opts), "WEIGHTS": weights}
    )
    cfg.MODEL.META_ARCHITECTURE = "LazyConfigModel"
    cfg.MODEL.WEIGHTS = ""  # LazyConfigModel loads LAZY_CONFIG.WEIGHTS, read as data only
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.INPUT.FORMAT = lazy.model.get("input_format", "BGR")
    cfg.INPUT.MIN_SIZE_TEST = short
    # The test resize caps the longest edge so that every image fits the model's square pad.
    cfg.INPUT.MAX_SIZE_TEST = longest or 1_000_000
    cfg.DATASETS.TEST = read_test_datasets(lazy)
    cfg.freeze()
    return cfg


class RobustPredictor(DefaultPredictor):
    """Detectron2's `DefaultPredictor` that takes an image file (read with `read_image_any`) or an
    array of any mode: ``[H, W]`` gray, ``[H, W, 1|2|3|4]``, uint8, 16-bit or float (see
    `as_uint8_image`), with 3-4 channels in BGR order, as `DefaultPredictor` takes them (it flips
    them itself for a model whose ``cfg.INPUT.FORMAT`` is RGB)."""

    def __call__(self, image: np.ndarray | str | os.PathLike) -> dict:
        if isinstance(image, (str, os.PathLike)):
            image = read_image_any(os.fspath(image), "BGR")
        return super().__call__(as_uint8_image(image, "BGR"))
