"""hiera_det: Hiera for detection and instance segmentation on Detectron2."""

__version__ = "0.1.0"
