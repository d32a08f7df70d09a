"""Evaluation as train_net.py runs it: `evaluate` is Detectron2's `inference_on_dataset` +
`print_csv_format` that scores a ``<name>_readable`` test dataset (images left out by
``dataset.skip_unreadable_test_images=True``, `hiera_det.data.datasets.check_test_datasets`) on its
images only and says so after the AP tables, and that turns an image failing mid-evaluation into
one line naming the file and the dataset. Policies in docs/reliability.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..data.images import BadImageError

__all__ = ["ImageSubsetEvaluator", "evaluate"]

logger = logging.getLogger(__name__)


class ImageSubsetEvaluator(DatasetEvaluator):
    """A `DatasetEvaluator` scored on the images `image_ids` only: ``evaluate(img_ids=...)``
    (Detectron2's `COCOEvaluator`: the ground truth of the other images of its json is not
    counted as missed), followed by `note` in the log, right after the evaluator's AP tables."""

    def __init__(self, evaluator: DatasetEvaluator, image_ids: list[int], note: str):
        self.evaluator, self.image_ids, self.note = evaluator, list(image_ids), note

    def reset(self) -> None:
        self.evaluator.reset()

    def process(self, inputs, outputs) -> None:
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        results = self.evaluator.evaluate(img_ids=self.image_ids)
        if comm.is_main_process():
            logger.warning(self.note)
        return results


def _left_out_note(names: list[str]) -> tuple[list[int], str] | None:
    """(image ids to score, the note) when a test dataset left images out, else None."""
    parts, image_ids = [], []
    for name in names:
        meta = MetadataCatalog.get(name)
        if "left_out_images" not in meta.as_dict():
            continue
        left_out = meta.left_out_images
        image_ids += meta.evaluated_image_ids
        parts.append(
            f"{len(left_out)} of the {meta.num_images_checked} images of "
            f"{meta.readable_subset_of!r} are left out "
            f"(unreadable; e.g. {left_out[0]})"
        )
    if not parts:
        return None
    return sorted(image_ids), (
        "The AP above is NOT over the whole test set (dataset.skip_unreadable_test_images=True): "
        + "; ".join(parts)
    )


def _original_message(error: BaseException) -> str:
    """The message of an error raised in a DataLoader worker (PyTorch re-raises it with the
    worker's traceback as its message: the original message is its last line)."""
    text = str(error).rstrip()
    if "Original Traceback" not in text:
        return text
    return text.splitlines()[-1].split(": ", 1)[-1]


def evaluate(
    model: torch.nn.Module,
    data_loader: Iterable,
    evaluator: DatasetEvaluator,
    dataset_names: str | list[str],
) -> dict:
    """Run `data_loader` (of `dataset_names`) through `model` and `evaluator`, print the results
    (`print_csv_format`) on the main process and return them.

    Raises:
        BadImageError: an image cannot be read (it changed after the check before the run, or
            is corrupt in a way the check does not see), in one line naming the file and the
            dataset.
    """
    names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    subset = _left_out_note(names)
    if subset is not None:
        evaluator = ImageSubsetEvaluator(evaluator, *subset)
    try:
        results = inference_on_dataset(model, data_loader, evaluator)
    except BadImageError as e:
        raise BadImageError(
            f"evaluating dataset {', '.join(map(repr, names))}: {_original_message(e)} (the "
            "check before the run passed it: it changed since, or is corrupt inside its data; "
            "training saves a checkpoint before each evaluation: fix the file and --resume)"
        ) from None
    if comm.is_main_process():
        print_csv_format(results)
        if subset is not None:
            logger.warning(subset[1])
    return results
