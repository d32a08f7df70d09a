"""Training helpers that Detectron2's engine lacks."""

from .optim import get_optimizer_params

__all__ = ["get_optimizer_params"]
