"""Datasets: `image_folder` (images for MAE pretraining) and `synthetic` (the built-in shapes
dataset). Submodules are not imported here: ``python -m hiera_det.data.synthetic`` must not find
its own module already imported."""
