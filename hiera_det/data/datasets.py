"""Datasets named in a config: COCO-format data of one's own from the command line, file checks.

Detectron2 reads datasets by registered name (``dataloader.train.dataset.names``). COCO 2017 is
built in (``coco_2017_train``, ``coco_2017_val``, under ``$DETECTRON2_DATASETS/coco``). For a
COCO-format dataset of your own (an instances json + an image folder), give train_net.py::

    dataset.train=[my_train,/data/annotations/train.json,/data/images/train]
    dataset.test=[my_val,/data/annotations/val.json,/data/images/val]

Each entry is ``[name, json_file, image_root]``, the arguments of Detectron2's
`register_coco_instances`. `apply_dataset_config` registers them, points the train/test loaders and
the evaluator at them and sets the detector's number of classes to the json's categories.

Before a run, `check_test_datasets` checks every image of the test loader's datasets and stops,
naming the files, on any that would not read; ``dataset.skip_unreadable_test_images=True`` evaluates
without them instead (on ``<name>_readable``, registered here; the AP tables say so).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils.registry import locate

from ..utils.once_per_job import once_per_job
from .validation import (
    SKIP_UNREADABLE_OPTION,
    DatasetError,
    UnreadableImages,
    check_test_images,
    validate_coco_json,
)

__all__ = [
    "apply_dataset_config",
    "check_dataset_files",
    "check_mask_format",
    "check_test_datasets",
    "dataset_checks_dir",
    "register_coco_format",
    "register_readable_subset",
]

# The keys of a config's ``dataset`` section (any ``dataset.*`` override passes the config check,
# so `apply_dataset_config` rejects others: a misspelt option must not be ignored).
_DATASET_KEYS = ("train", "test", "skip_unreadable_test_images")

logger = logging.getLogger(__name__)


def dataset_checks_dir(cfg) -> str:
    """Where a run keeps the verdicts of its dataset checks: ``<train.output_dir>/dataset_checks``
    (see `hiera_det.data.validation`)."""
    return os.path.join(cfg.train.output_dir, "dataset_checks")


def register_coco_format(
    name: str, json_file: str, image_root: str, cache_dir: str | None = None
) -> int:
    """Register a COCO-format instances dataset under `name`; return its number of categories.

    The json is checked by `validate_coco_json` (without looking for the image files; once per
    job: in the main process, whose verdict the others wait for), which raises `DatasetError` on
    what would make training wrong; train_net's later check of the same file does not parse it
    again, nor does a later run with the verdict kept in `cache_dir`. Registering the same name
    again with the same files is a no-op; with other files, an error.
    """
    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"dataset {name!r}: annotation file not found: {json_file}")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"dataset {name!r}: image folder not found: {image_root}")
    try:
        report = once_per_job(validate_coco_json, json_file, check_files=False, cache_dir=cache_dir)
    except DatasetError as e:
        raise DatasetError(f"dataset {name!r}: {e}") from e
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("json_file"), meta.get("image_root")) != (json_file, image_root):
            raise ValueError(
                f"dataset name {name!r} is already registered with json_file="
                f"{meta.get('json_file')!r}, image_root={meta.get('image_root')!r}; pick another"
            )
    else:
        register_coco_instances(name, {}, json_file, image_root)
    return report.num_categories


def _names(names: str | Iterable[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def _datasets_root() -> str:
    # The same expression Detectron2's builtin registration evaluates at import.
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def check_dataset_files(names: str | Iterable[str]) -> None:
    """Raise a clear error when a named dataset is unknown or its COCO files are missing."""
    for name in _names(names):
        if name not in DatasetCatalog.list():
            raise KeyError(
                f"dataset {name!r} is not registered. Built-in COCO names are e.g. "
                "'coco_2017_train' and 'coco_2017_val'; for a COCO-format dataset of your own give "
                "dataset.train=[name,json_file,image_root] (and dataset.test=[...]) on the "
                "command line"
            )
        meta = MetadataCatalog.get(name)
        files = [meta.get("json_file"), meta.get("image_root")]
        missing = [p for p in files if p and not os.path.exists(p)]
        if not missing:
            continue
        root = _datasets_root()
        message = f"dataset {name!r}: missing {', '.join(missing)}."
        if all(os.path.abspath(p).startswith(os.path.abspath(root)) for p in missing):
            message += (
                f" Detectron2's built-in datasets are read from $DETECTRON2_DATASETS (now "
                f"{os.getenv('DETECTRON2_DATASETS', 'unset: ./datasets')!r}); COCO 2017 is "
                "expected as $DETECTRON2_DATASETS/coco/annotations/instances_{train,val}2017.json "
                "and $DETECTRON2_DATASETS/coco/{train,val}2017/*.jpg. Set DETECTRON2_DATASETS "
                "before starting, or train on a COCO-format dataset of your own with "
                "dataset.train=[name,json_file,image_root]."
            )
        raise FileNotFoundError(message)


def _entry(cfg, key: str) -> tuple[str, str, str] | None:
    entry = cfg.get("dataset", {}).get(key) if "dataset" in cfg else None
    if entry is None:
        return None
    entry = list(entry)
    if len(entry) != 3 or not all(isinstance(x, str) for x in entry):
        raise ValueError(
            f"dataset.{key}={entry!r}: expected [name,json_file,image_root], e.g. "
            f"dataset.{key}=[my_{key},/data/{key}.json,/data/{key}_images]"
        )
    return entry[0], entry[1], entry[2]


def apply_dataset_config(cfg, splits: Iterable[str] = ("train", "test")) -> None:
    """Register ``cfg.dataset.{train,test}`` (if given; only those in `splits`) and point the
    config at them.

    Sets ``dataloader.train.dataset.names``, ``dataloader.test.dataset.names``,
    ``dataloader.evaluator.dataset_name`` and ``model.roi_heads.num_classes`` (from the training
    json's categories; the test json must have the same number). Configs without a
    ``dataset`` section are left alone.
    """
    unknown = [k for k in cfg.get("dataset", None) or {} if k not in _DATASET_KEYS]
    if unknown:
        raise KeyError(f"unknown key dataset.{unknown[0]}; the dataset keys are {_DATASET_KEYS}")
    num_classes = {}
    for key in splits:
        entry = _entry(cfg, key)
        if entry is None:
            continue
        name = entry[0]
        num_classes[key] = register_coco_format(*entry, cache_dir=dataset_checks_dir(cfg))
        loader = cfg.dataloader.get(key)
        if loader is None:
            raise KeyError(f"dataset.{key} is given but the config has no dataloader.{key}")
        loader.dataset.names = name
        if key == "test" and "evaluator" in cfg.dataloader:
            cfg.dataloader.evaluator.dataset_name = name
        logger.info(f"dataset.{key}: registered {name!r} ({entry[1]}, {entry[2]})")
    if len(set(num_classes.values())) > 1:
        raise ValueError(
            f"dataset.train and dataset.test have different numbers of categories: {num_classes}"
        )
    if num_classes and "roi_heads" in cfg.model and "num_classes" in cfg.model.roi_heads:
        cfg.model.roi_heads.num_classes = next(iter(num_classes.values()))


def register_readable_subset(found: UnreadableImages) -> str:
    """Register ``<dataset>_readable``: dataset `found.dataset` without the images `found` names
    (same metadata, plus ``readable_subset_of``, ``left_out_images`` (the messages),
    ``num_images_checked`` and ``evaluated_image_ids``, which `hiera_det.engine.evaluation`
    scores on); return its name."""
    name = f"{found.dataset}_readable"
    bad_paths = {path for _, path, _ in found.problems}
    bad_ids = {image_id for image_id, _, _ in found.problems}
    if name in DatasetCatalog.list():  # another run in this process, maybe with other files
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    original = found.dataset
    DatasetCatalog.register(
        name, lambda: [d for d in DatasetCatalog.get(original) if d["file_name"] not in bad_paths]
    )
    metadata = {k: v for k, v in MetadataCatalog.get(original).as_dict().items() if k != "name"}
    MetadataCatalog.get(name).set(
        **metadata,
        readable_subset_of=original,
        left_out_images=[message for _, _, message in found.problems],
        num_images_checked=found.num_images,
        evaluated_image_ids=sorted(i for i in found.image_ids if i not in bad_ids),
    )
    return name


def check_mask_format(cfg, reports: Iterable) -> None:
    """Raise `DatasetError` when a training json (its `ValidationReport`) has masks as RLEs
    (not crowd) and the training mapper reads masks as polygons, Detectron2's default: its
    loader workers would stop at the first such annotation."""
    mapper = cfg.dataloader.train.get("mapper", None) or {}
    if not mapper.get("use_instance_mask", False):
        return
    if mapper.get("instance_mask_format", "polygon") != "polygon":
        return
    for report in reports:
        if report.rle_masks:
            raise DatasetError(
                f"{report.json_file}: {len(report.rle_masks)} annotations (e.g. id "
                f"{report.rle_masks[0]}) give their mask as an RLE, which the training mapper's "
                "instance_mask_format='polygon' cannot hold; train with "
                "dataloader.train.mapper.instance_mask_format=bitmask"
            )


def _evaluator_takes_image_ids(cfg) -> bool:
    target = cfg.dataloader.evaluator.get("_target_")
    target = locate(target) if isinstance(target, str) else target
    evaluate = getattr(target, "evaluate", None)
    return evaluate is not None and "img_ids" in inspect.signature(evaluate).parameters


def check_test_datasets(cfg) -> None:
    """Before a run: `check_test_images` on ``dataloader.test.dataset.names`` (once per job: in
    the main process, whose findings every process acts on), which raises
    `DatasetError` naming every unreadable image; with ``dataset.skip_unreadable_test_images=True``
    the test loader reads `register_readable_subset` datasets instead (the evaluator must take
    ``img_ids``, as Detectron2's `COCOEvaluator` does)."""
    dataset = cfg.dataloader.test.get("dataset", {})
    if "names" not in dataset:
        return
    skip = bool((cfg.get("dataset", None) or {}).get("skip_unreadable_test_images", False))
    if skip and "evaluator" in cfg.dataloader and not _evaluator_takes_image_ids(cfg):
        raise DatasetError(
            f"{SKIP_UNREADABLE_OPTION} needs an evaluator whose evaluate() takes img_ids "
            f"(Detectron2's COCOEvaluator does); {cfg.dataloader.evaluator._target_} does not"
        )
    found = once_per_job(check_test_images, dataset.names, skip_unreadable=skip)
    found = {f.dataset: f for f in found}
    if not found:
        return
    names = [register_readable_subset(found[n]) if n in found else n for n in _names(dataset.names)]
    dataset.names = names[0] if isinstance(dataset.names, str) else names
