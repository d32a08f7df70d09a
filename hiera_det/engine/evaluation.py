"""Evaluation, as train_net.py and the configs run it.

Evaluation as train_net.py runs it: `evaluate` is Detectron2's `inference_on_dataset` +
`print_csv_format` that scores a ``<name>_readable`` test dataset (images left out by
``dataset.skip_unreadable_test_images=True``, `hiera_det.data.datasets.check_test_datasets`) on its
images only and says so after the AP tables, and that turns an image failing mid-evaluation into
one line naming the file and the dataset. Policies in docs/reliability.md.

COCO evaluation by faster-coco-eval's compiled COCOeval where it is installed, else pycocotools.

The Detectron2 wheel has no compiled fast evaluator (``detectron2._C``'s ``COCOeval_opt``), so its
`COCOEvaluator` runs pycocotools' pure-Python ``COCOeval`` (timings: docs/detection.md).
`FastCOCOEvaluator` is that evaluator with one change: the
COCOeval class it hands to Detectron2's ``_evaluate_predictions_on_coco`` is faster-coco-eval's
``COCOeval_faster`` (a maintained drop-in with the same matching rules and summary; the tests
check all 12 ``stats`` against pycocotools to 1e-4). Everything else — result conversion, the json
dump, the per-category table, distributed gathering — is Detectron2's.

Without faster-coco-eval (or with ``use_fast_impl=False``) it is Detectron2's `COCOEvaluator`
exactly. Each evaluation logs which implementation ran.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable
from unittest import mock

import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    coco_evaluation,
    inference_on_dataset,
    print_csv_format,
)
from detectron2.utils import comm

from ..data.images import BadImageError

__all__ = ["FastCOCOEvaluator", "ImageSubsetEvaluator", "evaluate", "faster_cocoeval_class"]

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


def faster_cocoeval_class() -> type | None:
    """faster-coco-eval's ``COCOeval_faster``, or None when the package is not importable."""
    try:
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return None
    return COCOeval_faster


class FastCOCOEvaluator(COCOEvaluator):
    """Detectron2's `COCOEvaluator`, computing AP with faster-coco-eval when it is installed.

    Args:
        dataset_name, *args, **kwargs: those of `detectron2.evaluation.COCOEvaluator`.
        use_fast_impl: True (default): faster-coco-eval if importable, otherwise what Detectron2
            chooses (its compiled ``COCOeval_opt`` if built, else pycocotools). False: pycocotools'
            official ``COCOeval``, as Detectron2 does.
    """

    def __init__(self, dataset_name: str, *args, use_fast_impl: bool = True, **kwargs):
        self._faster_cocoeval = faster_cocoeval_class() if use_fast_impl else None
        # With faster-coco-eval Detectron2's own fast path is not wanted (and its "not built"
        # message would be wrong); `_use_fast_impl` is switched back on below to select ours.
        fallback_fast = use_fast_impl and self._faster_cocoeval is None
        super().__init__(dataset_name, *args, use_fast_impl=fallback_fast, **kwargs)
        if self._faster_cocoeval is not None:
            self._use_fast_impl = True

    @property
    def implementation(self) -> str:
        """The COCOeval that computes AP and its package version, e.g. "faster-coco-eval 1.8.0"."""
        if self._faster_cocoeval is not None:
            return f"faster-coco-eval {importlib.metadata.version('faster-coco-eval')}"
        if self._use_fast_impl:  # Detectron2 was built with its C++ COCOeval_opt
            return f"Detectron2's COCOeval_opt ({importlib.metadata.version('detectron2')})"
        return f"pycocotools {importlib.metadata.version('pycocotools')}"

    def _eval_predictions(self, predictions, img_ids=None):
        self._logger.info(f"COCO evaluation of {self._metadata.name} by {self.implementation}")
        if self._faster_cocoeval is None:
            return super()._eval_predictions(predictions, img_ids)
        # Detectron2 picks the class by the module-level names `COCOeval_opt` (its C++ version,
        # used when `_use_fast_impl`) and `COCOevalMaxDets` (pycocotools' summary with AP at
        # maxDets[2] when max_dets_per_image != 100; faster-coco-eval's summary already reports AP
        # at maxDets[-1]). Both point at faster-coco-eval's class for this call only.
        with (
            mock.patch.object(coco_evaluation, "COCOeval_opt", self._faster_cocoeval),
            mock.patch.object(coco_evaluation, "COCOevalMaxDets", self._faster_cocoeval),
        ):
            return super()._eval_predictions(predictions, img_ids)
