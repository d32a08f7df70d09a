"""Evaluation, as train_net.py and the configs run it.

Evaluation as train_net.py runs it: `evaluate` is Detectron2's `inference_on_dataset` +
`print_csv_format` that scores a ``<name>_readable`` test dataset (images left out by
``dataset.skip_unreadable_test_images=True``, `hiera_det.data.datasets.check_test_datasets`) on its
images only and says so after the AP tables, and that turns an image failing mid-evaluation into
one line naming the file and the dataset. Policies in docs/reliability.md.

COCO evaluation by faster-coco-eval's compiled COCOeval where it is installed, else pycocotools.

The Detectron2 wheel has no compiled fast evaluator (``detectron2._C``'s ``COCOeval_opt``), so its
`COCOEvaluator` runs pycocotools' pure-Python ``COCOeval`` (timings: docs/detection.md).
`FastCOCOEvaluator` is that evaluator computing AP with faster-coco-eval's ``COCOeval_faster`` (a
maintained drop-in with the same matching rules and summary; the tests check all 12 ``stats``
against pycocotools to 1e-4). Detectron2 chooses its COCOeval class inside
``COCOEvaluator._eval_predictions`` from module globals and takes no argument for it, so that
method is restated here for the faster-coco-eval path (see `FastCOCOEvaluator._eval_predictions`);
result conversion, the AP tables, distributed gathering and the predictions file stay
Detectron2's methods. Without faster-coco-eval (or with ``use_fast_impl=False``) it is Detectron2's
`COCOEvaluator` exactly. Each evaluation logs which implementation ran.
"""

from __future__ import annotations

import copy
import importlib.metadata
import itertools
import json
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    inference_on_dataset,
    print_csv_format,
)
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..data.images import BadImageError
from ..utils import signals

__all__ = [
    "FastCOCOEvaluator",
    "ImageSubsetEvaluator",
    "evaluate",
    "faster_cocoeval_class",
    "run_cocoeval",
    "unmap_category_ids",
]

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
        # The test loader's workers are forked inside: they must never act on a cluster's stop
        # signals (hiera_det.utils.signals); the training process still records them.
        with signals.blocked():
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


def unmap_category_ids(coco_results: list[dict], metadata: Metadata) -> None:
    """Give COCO results (in place) the dataset's category ids instead of the model's contiguous
    class indices (``metadata.thing_dataset_id_to_contiguous_id``, if the dataset has one)."""
    to_contiguous = metadata.get("thing_dataset_id_to_contiguous_id")
    if to_contiguous is None:
        return
    to_dataset = {v: k for k, v in to_contiguous.items()}
    for result in coco_results:
        if result["category_id"] not in to_dataset:
            raise ValueError(
                f"a prediction has class {result['category_id']}, but dataset "
                f"{metadata.name!r} has {len(to_dataset)} classes (0 to {len(to_dataset) - 1})"
            )
        result["category_id"] = to_dataset[result["category_id"]]


def run_cocoeval(
    cocoeval_class: type,
    coco_gt,
    coco_results: list[dict],
    iou_type: str,
    *,
    max_dets: Sequence[int] = (1, 10, 100),
    img_ids: Sequence[int] | None = None,
    kpt_oks_sigmas: Sequence[float] = (),
):
    """Evaluate, accumulate and summarize COCO results with `cocoeval_class`, as Detectron2's
    ``_evaluate_predictions_on_coco`` does, except that the class is used for every `max_dets`
    (Detectron2 switches to pycocotools' ``COCOevalMaxDets`` when ``max_dets[2] != 100``; the
    summary of faster-coco-eval reports AP at ``max_dets[-1]`` itself). Returns the COCOeval."""
    if iou_type == "segm":
        # Mask AP by mask area: with a bbox in a result, cocoapi would take the box's area.
        coco_results = copy.deepcopy(coco_results)
        for result in coco_results:
            result.pop("bbox", None)
    coco_eval = cocoeval_class(coco_gt, coco_gt.loadRes(coco_results), iou_type)
    if iou_type != "keypoints":
        coco_eval.params.maxDets = list(max_dets)
    elif kpt_oks_sigmas:
        coco_eval.params.kpt_oks_sigmas = np.array(kpt_oks_sigmas)
    if img_ids is not None:
        coco_eval.params.imgIds = list(img_ids)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


class FastCOCOEvaluator(COCOEvaluator):
    """Detectron2's `COCOEvaluator`, computing AP with faster-coco-eval when it is installed.

    Args:
        dataset_name, *args, **kwargs: those of `detectron2.evaluation.COCOEvaluator`.
        use_fast_impl: True (default): faster-coco-eval if importable, otherwise what Detectron2
            chooses (its compiled ``COCOeval_opt`` if built, else pycocotools). False: pycocotools'
            official ``COCOeval``, as Detectron2 does.
    """

    def __init__(self, dataset_name: str, *args, use_fast_impl: bool = True, **kwargs):
        # The COCOeval class of the faster-coco-eval path; None: Detectron2's own evaluation.
        self.cocoeval_class = faster_cocoeval_class() if use_fast_impl else None
        # With faster-coco-eval, Detectron2's fast path is not used (and its "not built" message
        # would be wrong).
        fallback_fast = use_fast_impl and self.cocoeval_class is None
        super().__init__(dataset_name, *args, use_fast_impl=fallback_fast, **kwargs)

    @property
    def implementation(self) -> str:
        """The COCOeval that computes AP and its package version, e.g. "faster-coco-eval 1.8.0"."""
        if self.cocoeval_class is not None:
            return f"faster-coco-eval {importlib.metadata.version('faster-coco-eval')}"
        if self._use_fast_impl:  # Detectron2 was built with its C++ COCOeval_opt
            return f"Detectron2's COCOeval_opt ({importlib.metadata.version('detectron2')})"
        return f"pycocotools {importlib.metadata.version('pycocotools')}"

    def _eval_predictions(self, predictions: list[dict], img_ids=None) -> None:
        """Fill ``self._results``: Detectron2's method without faster-coco-eval; with it, the same
        steps restated (Detectron2 names its COCOeval class inside the method): category ids
        unmapped, ``coco_instances_results.json`` written, then per task `run_cocoeval` with
        ``self.cocoeval_class`` and Detectron2's `_derive_coco_results` (the AP tables)."""
        self._logger.info(f"COCO evaluation of {self._metadata.name} by {self.implementation}")
        if self.cocoeval_class is None:
            return super()._eval_predictions(predictions, img_ids)
        coco_results = list(itertools.chain(*[x["instances"] for x in predictions]))
        tasks = self._tasks or self._tasks_from_predictions(coco_results)
        unmap_category_ids(coco_results, self._metadata)
        if self._output_dir:
            file_path = os.path.join(self._output_dir, "coco_instances_results.json")
            self._logger.info(f"Saving results to {file_path}")
            with PathManager.open(file_path, "w") as f:
                f.write(json.dumps(coco_results))
        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return None
        for task in sorted(tasks):
            coco_eval = None  # cocoapi does not handle empty results: Detectron2 reports NaN
            if coco_results:
                coco_eval = run_cocoeval(
                    self.cocoeval_class,
                    self._coco_api,
                    coco_results,
                    task,
                    max_dets=self._max_dets_per_image,
                    img_ids=img_ids,
                    kpt_oks_sigmas=self._kpt_oks_sigmas,
                )
            classes = self._metadata.get("thing_classes")
            self._results[task] = self._derive_coco_results(coco_eval, task, class_names=classes)
        return None
