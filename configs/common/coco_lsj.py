"""COCO 2017 with large-scale jitter (LSJ) at 1024 px, as ViTDet and the paper (Table 15) train.

Train: random horizontal flip, resize by a random factor in [0.1, 2.0] of the 1024 square, then a
random 1024x1024 crop (not padded here: the model pads to its 1024 square). Test: resize the
shortest edge to 1024 with the longest edge capped at 1024 (ViTDet's test transform), so every test
image fits the model's square. Images are RGB, as Hiera was pretrained.

Datasets are Detectron2's built-in names, read from ``$DETECTRON2_DATASETS/coco`` (default
``./datasets/coco``); see `hiera_det.data` to train and evaluate on a COCO-format dataset of one's
own from the command line.
"""

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from hiera_det.data.mapper import EvaluationDatasetMapper, RobustDatasetMapper
from hiera_det.data.sampling import build_resumable_train_loader
from hiera_det.engine.evaluation import FastCOCOEvaluator

image_size = 1024


def lsj_augmentations(size: int, min_scale: float = 0.1, max_scale: float = 2.0) -> list:
    """Large-scale jitter on a `size` square: flip, resize by a random factor in
    [min_scale, max_scale] of the square, random `size` x `size` crop (unpadded)."""
    return [
        L(T.RandomFlip)(horizontal=True),
        L(T.ResizeScale)(
            min_scale=min_scale, max_scale=max_scale, target_height=size, target_width=size
        ),
        L(T.FixedSizeCrop)(crop_size=(size, size), pad=False),
    ]


def square_test_resize(size: int) -> list:
    """Shortest edge to `size`, longest capped at `size`: every test image fits the square."""
    return [L(T.ResizeShortestEdge)(short_edge_length=size, max_size=size)]


dataloader = model_zoo.get_config("common/data/coco.py").dataloader
# Same arguments as Detectron2's: a loader that --resume continues exactly (and that gives the same
# batches on any number of processes), and a mapper that skips unreadable images with a message
# and reads 16-bit, gray and RGBA images (docs/reliability.md).
dataloader.train._target_ = build_resumable_train_loader
dataloader.train.mapper._target_ = RobustDatasetMapper
dataloader.train.mapper.augmentations = lsj_augmentations(image_size)
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.recompute_boxes = True  # boxes cut by the crop are re-fit to their masks
dataloader.train.total_batch_size = 64
# Detectron2's test mapper, whose error on an unreadable image names the file.
dataloader.test.mapper._target_ = EvaluationDatasetMapper
dataloader.test.mapper.augmentations = square_test_resize(image_size)
# Detectron2's COCOEvaluator with faster-coco-eval's compiled COCOeval (pycocotools if it is not
# installed): the same AP in a fraction of the time (measured in docs/detection.md).
dataloader.evaluator._target_ = FastCOCOEvaluator
