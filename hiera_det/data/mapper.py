"""The training-time mapper: `RobustDatasetMapper` is Detectron2's `DatasetMapper` (same
arguments) that reads every image mode correctly (`read_image_any`), skips an unreadable, missing
or wrongly sized image by `BadImageSkipper`'s policy (a warning naming the file and a running
count; returning None makes the loader take another image; a stop when
`max_consecutive_failures` images in a row are unreadable) and drops the annotations
`find_annotation_problem` rejects. `EvaluationDatasetMapper` is `DatasetMapper` whose read errors
name the file. Policies in docs/reliability.md.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.dataset_mapper import DatasetMapper

from .images import BadImageError, BadImageSkipper, read_image_any
from .validation import find_annotation_problem

__all__ = ["EvaluationDatasetMapper", "RobustDatasetMapper"]

logger = logging.getLogger(__name__)


class RobustDatasetMapper(DatasetMapper):
    """Detectron2's `DatasetMapper` (same arguments) that never stops on a bad image.

    Args:
        max_consecutive_failures: raise when this many images in a row could not be read: then
            the data is broken, not a few files.
        *args, **kwargs: `DatasetMapper`'s.

    Returns None (the loader then maps another image) for an image that is missing, unreadable or
    of another size than its annotation says, logging the file and the running count of this
    process (`BadImageSkipper`; each loader worker counts its own). Annotations that
    `find_annotation_problem` rejects are dropped. Images are read with `read_image_any` (any
    mode, 16-bit scaled).
    """

    def __init__(self, *args, max_consecutive_failures: int = 100, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_format not in ("BGR", "RGB"):
            raise ValueError(f"image_format must be 'BGR' or 'RGB', got {self.image_format!r}")
        self.skipper = BadImageSkipper(max_consecutive_failures)
        self.num_skipped_annotations = 0

    @property
    def num_skipped_images(self) -> int:
        """Images this process has skipped so far."""
        return self.skipper.num_skipped

    def _read(self, dataset_dict: dict) -> np.ndarray:
        """The image of `dataset_dict`, or `BadImageError` (naming the file) when it cannot be
        read or is not of the size the dataset says."""
        image = read_image_any(dataset_dict["file_name"], self.image_format)
        try:
            utils.check_image_size(dataset_dict, image)
        except utils.SizeMismatchError as e:  # its message names the file
            raise BadImageError(str(e)) from e
        return image

    def _drop_bad_annotations(self, dataset_dict: dict, width: int, height: int) -> None:
        kept = []
        for index, ann in enumerate(dataset_dict.get("annotations", [])):
            problem = find_annotation_problem(ann, width, height)
            if problem is None:
                kept.append(ann)
                continue
            self.num_skipped_annotations += 1
            logger.debug(f"{dataset_dict['file_name']}: annotation {index} skipped: {problem}")
        dataset_dict["annotations"] = kept

    def __call__(self, dataset_dict: dict) -> dict | None:
        image = self.skipper.read(dataset_dict["file_name"], lambda _: self._read(dataset_dict))
        if image is None:
            return None
        dataset_dict = copy.deepcopy(dataset_dict)  # modified below
        if "annotations" in dataset_dict:
            self._drop_bad_annotations(dataset_dict, image.shape[1], image.shape[0])
        return self._map_image(dataset_dict, image)

    def _map_image(self, dataset_dict: dict, image: np.ndarray) -> dict:
        """`DatasetMapper.__call__` after it has read the image (Detectron2 0.6-0.7.2).

        Detectron2 reads inline, with the module function `detection_utils.read_image`, so no
        method of `DatasetMapper` reads the image and none can be overridden to read it with
        `read_image_any`; the steps after the read are these lines of its ``__call__``, and
        ``tests/test_mapper.py`` checks that they give what `DatasetMapper` gives.
        """
        sem_seg_gt = None
        if "sem_seg_file_name" in dataset_dict:
            sem_seg_gt = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict


class EvaluationDatasetMapper(DatasetMapper):
    """Detectron2's `DatasetMapper` (same arguments, same output) for the test loader, whose error
    on an image that cannot be read names the file: `BadImageError` instead of PIL's bare
    ``OSError: image file is truncated``. It reads as `DatasetMapper` does and skips nothing:
    evaluation scores every image (`hiera_det.data.validation.check_test_images` checks them
    before the run; this catches a file that changed since)."""

    def __call__(self, dataset_dict: dict) -> dict:
        try:
            return super().__call__(dataset_dict)
        except (OSError, utils.SizeMismatchError) as e:
            raise BadImageError(
                f"cannot read image {dataset_dict.get('file_name')}: {type(e).__name__}: {e}"
            ) from e
