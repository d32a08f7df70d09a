"""hiera_det: Hiera for detection and instance segmentation on Detectron2."""

__version__ = "0.1.0"

__all__ = ["predictor_cfg"]


def __getattr__(name: str):
    # Imported on first use: `import hiera_det` stays light, and importing the predictor module
    # registers the "LazyConfigModel" meta-architecture that DefaultPredictor builds.
    if name == "predictor_cfg":
        from .predictor import predictor_cfg

        return predictor_cfg
    raise AttributeError(f"module 'hiera_det' has no attribute {name!r}")
