"""COCO evaluation by faster-coco-eval's compiled COCOeval where it is installed, else pycocotools.

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
from unittest import mock

from detectron2.evaluation import COCOEvaluator, coco_evaluation

__all__ = ["FastCOCOEvaluator", "faster_cocoeval_class"]


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
