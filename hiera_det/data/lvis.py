"""LVIS v1 pieces for LazyConfigs: federated-loss class weights and the LVIS evaluator.

Detectron2's ViTDet LVIS configs pass the federated loss its class weights as a ``lambda``; a
config holding a lambda cannot be saved as yaml (`LazyConfig.save` falls back to a pickle). Here
the same callable comes from an importable factory, so the config stays plain data. The LVIS
evaluator needs the ``lvis`` package, which Detectron2 imports only when evaluation starts;
`build_lvis_evaluator` checks for it first and says how to install it.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence

import torch
from detectron2.data.detection_utils import get_fed_loss_cls_weights
from detectron2.evaluation import LVISEvaluator

__all__ = ["build_lvis_evaluator", "fed_loss_cls_weights"]

# `pip install lvis` also pulls opencv-python (beside our opencv-python-headless) and Cython; what
# the package imports at run time (numpy, pycocotools, matplotlib, cv2) is already installed.
LVIS_INSTALL_HINT = "pip install --no-deps lvis"


def fed_loss_cls_weights(
    dataset_names: str | Sequence[str], freq_weight_power: float = 0.5
) -> Callable[[], torch.Tensor]:
    """The ``get_fed_loss_cls_weights`` argument of `FastRCNNOutputLayers`: a callable returning
    each class's image count to the power `freq_weight_power` (ViTDet: 0.5), read from the
    ``class_image_count`` metadata of `dataset_names` (Detectron2's LVIS registrations have it)."""
    names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    return functools.partial(get_fed_loss_cls_weights, names, freq_weight_power)


def build_lvis_evaluator(dataset_name: str, **kwargs) -> LVISEvaluator:
    """Detectron2's `LVISEvaluator(dataset_name, **kwargs)`, failing with an install hint when the
    ``lvis`` package is missing."""
    if importlib.util.find_spec("lvis") is None:
        raise ModuleNotFoundError(
            f"LVIS evaluation (dataset {dataset_name!r}) needs the 'lvis' package, which is not "
            f"installed. Install it with: {LVIS_INSTALL_HINT}",
            name="lvis",
        )
    return LVISEvaluator(dataset_name, **kwargs)
