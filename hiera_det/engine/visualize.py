"""Pictures of detections: one drawing function (Detectron2's `Visualizer`) for `demo.py` and a
training hook that draws the model's predictions on a few images of a dataset after training."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import HookBase
from detectron2.structures import Instances
from detectron2.utils import comm
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["PredictionPicturesHook", "draw_predictions", "drawing_scale"]

logger = logging.getLogger(__name__)


def drawing_scale(height: int, width: int, min_side: int = 512) -> float:
    """Upscale small images (e.g. 128 px) so that labels and scores stay legible."""
    return max(1.0, min_side / max(1, min(height, width)))


def draw_predictions(
    image_rgb: np.ndarray,
    instances: Instances,
    metadata=None,
    score_threshold: float = 0.0,
    scale: float | None = None,
) -> np.ndarray:
    """Draw boxes, masks, class names and scores of `instances` (on CPU) over an RGB image.

    Returns the drawing as an RGB uint8 array (upscaled by `scale`, by default `drawing_scale`).
    """
    if "scores" in instances.get_fields():
        instances = instances[instances.scores >= score_threshold]
    h, w = image_rgb.shape[:2]
    visualizer = Visualizer(
        image_rgb,
        metadata,
        scale=drawing_scale(h, w) if scale is None else scale,
        instance_mode=ColorMode.IMAGE,
    )
    return visualizer.draw_instance_predictions(instances.to("cpu")).get_image()


def draw_ground_truth(image_rgb: np.ndarray, record: dict, metadata, scale: float) -> np.ndarray:
    """Draw the annotations of a Detectron2 dataset record over its RGB image."""
    visualizer = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_dataset_dict(record).get_image()


class PredictionPicturesHook(HookBase):
    """After training, draw the model's predictions on the first images of a dataset.

    Each picture is ``ground truth | prediction`` side by side, written to
    ``{output_dir}/{file name}.png``. Registered through ``train.extra_hooks``.

    Args:
        dataset_name: a registered Detectron2 dataset (e.g. the test set).
        mapper: the test-time mapper (``dataloader.test.mapper``): resizes the image as the
            evaluation does.
        output_dir: where the pictures go.
        num_images: how many images to draw (the dataset's first ones).
        score_threshold: detections below this score are not drawn.
    """

    def __init__(
        self,
        dataset_name: str,
        mapper: Callable[[dict], dict],
        output_dir: str,
        num_images: int = 8,
        score_threshold: float = 0.5,
    ):
        self.dataset_name, self.mapper, self.output_dir = dataset_name, mapper, output_dir
        self.num_images, self.score_threshold = num_images, score_threshold

    def after_train(self):
        # `after_train` also runs when training stopped early on an error: draw only after a
        # complete run (as Detectron2's EvalHook evaluates only then).
        if self.trainer.iter + 1 < self.trainer.max_iter or not comm.is_main_process():
            return
        paths = self.write()
        logger.info(f"Pictures of predictions on {len(paths)} images written to {self.output_dir}")

    @torch.no_grad()
    def write(self) -> list[str]:
        model = self.trainer.model
        model = getattr(model, "module", model)  # DistributedDataParallel
        metadata = MetadataCatalog.get(self.dataset_name)
        records = DatasetCatalog.get(self.dataset_name)[: self.num_images]
        os.makedirs(self.output_dir, exist_ok=True)
        was_training = model.training
        model.eval()
        paths = []
        try:
            for record in records:
                instances = model([self.mapper(dict(record))])[0]["instances"]
                image = read_image(record["file_name"], format="RGB")
                scale = drawing_scale(*image.shape[:2])
                truth = draw_ground_truth(image, record, metadata, scale)
                pred = draw_predictions(image, instances, metadata, self.score_threshold, scale)
                name = os.path.splitext(os.path.basename(record["file_name"]))[0] + ".png"
                path = os.path.join(self.output_dir, name)
                cv2.imwrite(path, np.concatenate([truth, pred], axis=1)[:, :, ::-1])
                paths.append(path)
        finally:
            model.train(was_training)
        return paths
