"""Bad data: images of any mode, unreadable files, faulty COCO annotations. Policies in
docs/reliability.md.

Two layers, sharing one definition of a bad annotation (`find_annotation_problem`):

- Before training, `validate_coco_json` reads a COCO instances file and **stops** (`DatasetError`,
  naming the file and the annotation or image id) on what would make the run wrong: malformed json,
  unknown category ids, annotations of unknown images, duplicate ids, a bbox that is not 4
  numbers, no image file at all. It **counts and reports** (with examples) what training will
  skip: empty or degenerate polygons, empty boxes, boxes wholly outside their image, missing
  image files.
- While training, `RobustDatasetMapper` (Detectron2's `DatasetMapper`, same arguments) reads every
  image mode correctly (`read_image_any`), skips an unreadable, missing or wrongly sized image
  with a warning naming the file and a running count (returning None makes Detectron2's loader
  take another image), drops the annotations `find_annotation_problem` rejects, and stops when
  `max_consecutive_failures` images in a row are unreadable (the image folder itself is broken).

`as_uint8_image` turns any array a user may hand to a predictor (gray, RGBA, 16-bit, float) into
the 8-bit 3-channel image Detectron2 models take; `RobustPredictor` applies it before
Detectron2's `DefaultPredictor`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.dataset_mapper import DatasetMapper
from detectron2.engine import DefaultPredictor
from detectron2.structures import BoxMode
from PIL import Image

__all__ = [
    "BadImageError",
    "DatasetError",
    "RobustDatasetMapper",
    "RobustPredictor",
    "ValidationReport",
    "as_uint8_image",
    "find_annotation_problem",
    "read_image_any",
    "validate_coco_json",
    "validate_datasets",
]

logger = logging.getLogger(__name__)

_EXAMPLES = 5  # examples named per kind of problem in a report


class DatasetError(ValueError):
    """A dataset problem that must be fixed before training (raised before the first step)."""


class BadImageError(OSError):
    """An image file that cannot be used: missing, truncated, corrupt or of the wrong size."""


# --- images -------------------------------------------------------------------------------------


def as_uint8_image(image: np.ndarray, format: str = "BGR") -> np.ndarray:
    """Any image array -> ``[H, W, 3]`` uint8 in `format` ("BGR" or "RGB").

    Gray ``[H, W]`` / ``[H, W, 1]`` is repeated to 3 channels; a 4th (alpha) channel is dropped;
    a 2-channel gray+alpha image keeps its gray channel; 16-bit integers are scaled by 1/257
    (65535 -> 255); floats in [0, 1] are scaled by 255, other floats clipped to [0, 255]. A 3- or
    4-channel input is taken to be in `format` already (channels are not reordered).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or 0 in image.shape[:2]:
        raise ValueError(f"expected an [H, W] or [H, W, 1-4] image, got shape {image.shape}")
    if image.shape[2] in (1, 2):
        image = np.repeat(image[:, :, :1], 3, axis=2)
    image = image[:, :, :3]
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.integer):
        if image.dtype.itemsize >= 2 and image.max(initial=0) > 255:
            image = image.astype(np.float64) / 257.0
        return np.clip(image, 0, 255).round().astype(np.uint8)
    image = image.astype(np.float64)
    if not np.isfinite(image).all():
        raise ValueError("image has NaN or infinite values")
    if image.max(initial=0.0) <= 1.0:
        image = image * 255.0
    return np.clip(image, 0, 255).round().astype(np.uint8)


def read_image_any(path: str, format: str = "BGR") -> np.ndarray:
    """Read an image file of any mode into ``[H, W, 3]`` uint8 `format` ("BGR" or "RGB").

    Unlike Detectron2's `read_image` (PIL ``convert``), 16-bit images are scaled rather than
    clipped at 255; EXIF orientation is applied the same way. Gray, palette, CMYK and RGBA
    (alpha dropped) images become 3-channel.

    Raises:
        BadImageError: the file is missing, truncated or not an image (naming the file).
    """
    if format not in ("BGR", "RGB"):
        raise ValueError(f"format must be 'BGR' or 'RGB', got {format!r}")
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()  # decodes everything now: a truncated file fails here, not later
    except FileNotFoundError as e:
        raise BadImageError(f"image file not found: {path}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... depending on format
        raise BadImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    image = utils._apply_exif_orientation(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image)  # 16/32-bit gray: scale instead of PIL's clip at 255
        if image.mode == "I" and array.max(initial=0) > 65535:
            array = array.astype(np.float64) * (255.0 / array.max())
        elif image.mode == "F" and array.max(initial=0.0) > 1.0:
            array = np.clip(array, 0, 65535).astype(np.uint16)
        array = as_uint8_image(array, "RGB")
    else:
        array = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(array[:, :, ::-1] if format == "BGR" else array)


# --- annotations --------------------------------------------------------------------------------


def _polygon_area(poly: list[float]) -> float:
    xs, ys = np.asarray(poly[0::2], np.float64), np.asarray(poly[1::2], np.float64)
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def find_annotation_problem(annotation: Mapping, width: int, height: int) -> str | None:
    """Why an instance annotation cannot be trained on, or None if it can.

    `annotation` is a COCO annotation (``bbox`` is XYWH) or a Detectron2 dataset-dict annotation
    (``bbox_mode`` says). Boxes partly outside the image are fine (clipped by the mapper); rejected
    are: a bbox that is not 4 finite numbers, an empty box, a box wholly outside the image, and a
    segmentation with no usable polygon (each needs >= 3 points and a non-zero area) or an RLE of
    another size than the image.
    """
    found = _check_annotation(annotation, width, height)
    return None if found is None else f"{found[0]}: {found[1]}"


def _check_annotation(annotation: Mapping, width: int, height: int) -> tuple[str, str] | None:
    """(kind of problem, details) or None; see `find_annotation_problem`."""
    bbox = annotation.get("bbox")
    if (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
    ):
        return "bad bbox", f"{bbox!r} is not 4 finite numbers"
    mode = annotation.get("bbox_mode", BoxMode.XYWH_ABS)
    x0, y0, x1, y1 = BoxMode.convert(list(bbox), mode, BoxMode.XYXY_ABS)
    if x1 <= x0 or y1 <= y0:
        return "empty box", f"{list(bbox)} has a width or height <= 0"
    if x0 >= width or y0 >= height or x1 <= 0 or y1 <= 0:
        return "box outside the image", f"{list(bbox)} in a {width}x{height} image"
    segm = annotation.get("segmentation")
    if segm is None:
        return None
    if isinstance(segm, dict):  # RLE
        size = segm.get("size")
        if "counts" not in segm or size is None:
            return "bad RLE", "no 'counts' or 'size'"
        if list(size) != [height, width]:
            return "bad RLE", f"size {list(size)} in a {height}x{width} image"
        return None
    if not isinstance(segm, list):
        return "bad segmentation", f"of type {type(segm).__name__} (expected polygons or RLE)"
    polygons = [
        p
        for p in segm
        if isinstance(p, list)
        and len(p) >= 6
        and len(p) % 2 == 0
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)
    ]
    if not polygons:
        if not segm:
            return "empty segmentation", "no polygon"
        return "bad polygon", f"none of {len(segm)} polygons has >= 3 points"
    if all(_polygon_area(p) <= 0 for p in polygons):
        return "degenerate polygon", "zero area"
    return None


@dataclass
class ValidationReport:
    """What `validate_coco_json` found in a file that training can go on with.

    ``skipped_annotations``: problem -> annotation ids that training will skip;
    ``missing_images``: image file names not found (training skips those images).
    """

    json_file: str
    num_images: int = 0
    num_annotations: int = 0
    skipped_annotations: dict[str, list] = field(default_factory=dict)
    missing_images: list[str] = field(default_factory=list)

    @property
    def num_skipped_annotations(self) -> int:
        return sum(len(ids) for ids in self.skipped_annotations.values())

    def __str__(self) -> str:
        lines = [
            f"{self.json_file}: {self.num_images} images, {self.num_annotations} annotations; "
            f"training skips {self.num_skipped_annotations} annotations and "
            f"{len(self.missing_images)} missing images"
        ]
        for problem, ids in sorted(self.skipped_annotations.items()):
            shown = ", ".join(str(i) for i in ids[:_EXAMPLES])
            lines.append(
                f"  {len(ids)} x {problem}: annotation id {shown}" + " ..." * (len(ids) > _EXAMPLES)
            )
        if self.missing_images:
            shown = ", ".join(self.missing_images[:_EXAMPLES])
            more = " ..." * (len(self.missing_images) > _EXAMPLES)
            lines.append(f"  {len(self.missing_images)} image files not found: {shown}{more}")
        return "\n".join(lines)


def _existing_files(image_root: str, file_names: Iterable[str]) -> set[str]:
    """The `file_names` (relative to `image_root`) that exist: one directory listing per folder
    instead of a stat per file (COCO has 118k images, often on a network file system)."""
    listed: dict[str, set[str]] = {}
    found = set()
    for name in file_names:
        folder, base = os.path.split(os.path.join(image_root, name))
        if folder not in listed:
            try:
                listed[folder] = {e.name for e in os.scandir(folder) if e.is_file()}
            except OSError:
                listed[folder] = set()
        if base in listed[folder]:
            found.add(name)
    return found


def _fail(json_file: str, what: str) -> DatasetError:
    return DatasetError(f"{json_file}: {what}. Fix the annotation file; training has not started.")


def validate_coco_json(
    json_file: str, image_root: str | None = None, check_files: bool = True
) -> ValidationReport:
    """Check a COCO instances file before training; see the module docstring for the policy.

    Args:
        json_file: the instances json.
        image_root: folder the images' ``file_name`` are relative to (for `check_files`).
        check_files: look for every image file (one directory listing per folder).

    Raises:
        DatasetError: a problem that stops training, naming the file and the ids at fault.
    """
    try:
        with open(json_file) as f:
            content = json.load(f)
    except FileNotFoundError as e:
        raise DatasetError(f"annotation file not found: {json_file}") from e
    except json.JSONDecodeError as e:
        raise _fail(json_file, f"not valid JSON ({e})") from e
    if not isinstance(content, dict):
        raise _fail(json_file, f"top level is a {type(content).__name__}, not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(content.get(key), list):
            raise _fail(json_file, f"no {key!r} list (not a COCO instances file)")
    categories, images = content["categories"], content["images"]
    if not categories:
        raise _fail(json_file, "'categories' is empty")
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise _fail(json_file, f"categories[{i}] = {cat!r} needs an integer 'id' and a 'name'")
    category_ids = [c["id"] for c in categories]
    duplicates = [i for i, n in Counter(category_ids).items() if n > 1]
    if duplicates:
        raise _fail(json_file, f"duplicate category ids {duplicates}")

    sizes: dict[int, tuple[int, int]] = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int):
            raise _fail(json_file, f"images[{i}] has no integer 'id'")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise _fail(json_file, f"image id {img['id']} has no 'file_name'")
        w, h = img.get("width"), img.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise _fail(
                json_file,
                f"image id {img['id']} ({img['file_name']}) has width={w!r}, height={h!r}; "
                "both must be positive integers",
            )
        if img["id"] in sizes:
            raise _fail(json_file, f"duplicate image id {img['id']} ({img['file_name']})")
        sizes[img["id"]] = (w, h)

    report = ValidationReport(json_file, len(images), len(content["annotations"]))
    known = set(category_ids)
    seen_ids = set()
    for i, ann in enumerate(content["annotations"]):
        if not isinstance(ann, dict):
            raise _fail(json_file, f"annotations[{i}] is a {type(ann).__name__}, not an object")
        ann_id = ann.get("id", f"#{i}")
        if ann_id in seen_ids:
            raise _fail(json_file, f"duplicate annotation id {ann_id}")
        seen_ids.add(ann_id)
        if ann.get("image_id") not in sizes:
            raise _fail(
                json_file,
                f"annotation id {ann_id} refers to unknown image id {ann.get('image_id')!r}",
            )
        if ann.get("category_id") not in known:
            raise _fail(
                json_file,
                f"annotation id {ann_id} (image id {ann['image_id']}) has category_id "
                f"{ann.get('category_id')!r}, which is not in 'categories' "
                f"(ids {sorted(known)[:20]}{' ...' * (len(known) > 20)})",
            )
        problem = _check_annotation(ann, *sizes[ann["image_id"]])
        if problem is not None and problem[0] == "bad bbox":  # Detectron2's loader would fail
            raise _fail(json_file, f"annotation id {ann_id}: bbox {problem[1]}")
        if problem is not None:
            report.skipped_annotations.setdefault(problem[0], []).append(ann_id)

    if check_files and image_root is not None and images:
        names = [img["file_name"] for img in images]
        found = _existing_files(image_root, names)
        report.missing_images = [n for n in names if n not in found]
        if not found:
            raise _fail(
                json_file,
                f"none of its {len(names)} image files is under {image_root} (e.g. "
                f"{os.path.join(image_root, names[0])}); is the image folder right?",
            )
    return report


def validate_datasets(
    names: str | Iterable[str], check_files: bool = True
) -> list[ValidationReport]:
    """`validate_coco_json` for each named dataset registered from a COCO json (Detectron2's
    `register_coco_instances`, built-in COCO); others are left alone. Logs each report."""
    reports = []
    for name in [names] if isinstance(names, str) else names:
        meta = MetadataCatalog.get(name)
        json_file = meta.get("json_file")
        if not json_file or not os.path.isfile(json_file):
            continue  # not a COCO-json dataset, or generated on first use
        report = validate_coco_json(json_file, meta.get("image_root"), check_files)
        (
            logger.warning
            if report.num_skipped_annotations or report.missing_images
            else logger.info
        )(f"dataset {name!r}: {report}")
        reports.append(report)
    return reports


# --- training-time mapper -----------------------------------------------------------------------


class RobustDatasetMapper(DatasetMapper):
    """Detectron2's `DatasetMapper` (same arguments) that never stops on a bad image.

    Args:
        max_consecutive_failures: raise when this many images in a row could not be read: then
            the data is broken, not a few files.
        *args, **kwargs: `DatasetMapper`'s.

    Returns None (Detectron2's loader then maps another image) for an image that is missing,
    unreadable or of another size than its annotation says, logging the file and the running count
    of this process (each loader worker counts its own). Annotations that `find_annotation_problem`
    rejects are dropped. Images are read with `read_image_any` (any mode, 16-bit scaled).
    """

    def __init__(self, *args, max_consecutive_failures: int = 100, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_format not in ("BGR", "RGB"):
            raise ValueError(f"image_format must be 'BGR' or 'RGB', got {self.image_format!r}")
        self.max_consecutive_failures = max_consecutive_failures
        self.num_skipped_images = 0
        self.num_skipped_annotations = 0
        self._consecutive_failures = 0

    def _read(self, dataset_dict: dict) -> np.ndarray | None:
        path = dataset_dict["file_name"]
        try:
            image = read_image_any(path, self.image_format)
            utils.check_image_size(dataset_dict, image)
        except (BadImageError, utils.SizeMismatchError) as e:
            self.num_skipped_images += 1
            self._consecutive_failures += 1
            logger.warning(
                f"Skipped image: {e} ({self.num_skipped_images} images skipped so far by this "
                "process)"
            )
            if self._consecutive_failures >= self.max_consecutive_failures:
                raise RuntimeError(
                    f"{self._consecutive_failures} images in a row could not be read (the last: "
                    f"{path}); the image folder or the annotation file is wrong"
                ) from e
            return None
        self._consecutive_failures = 0
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
        image = self._read(dataset_dict)
        if image is None:
            return None
        dataset_dict = copy.deepcopy(dataset_dict)  # modified below
        if "annotations" in dataset_dict:
            self._drop_bad_annotations(dataset_dict, image.shape[1], image.shape[0])
        # The rest is DatasetMapper.__call__ after its read_image (Detectron2 0.6-0.7).
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


# --- inference ----------------------------------------------------------------------------------


class RobustPredictor(DefaultPredictor):
    """Detectron2's `DefaultPredictor` that takes an image of any mode: ``[H, W]`` gray,
    ``[H, W, 1|2|3|4]``, uint8, 16-bit or float (see `as_uint8_image`), in ``cfg.INPUT.FORMAT``
    order when it has 3-4 channels; or a path (read with `read_image_any`)."""

    def __call__(self, image: np.ndarray | str) -> dict:
        if isinstance(image, (str, os.PathLike)):
            image = read_image_any(os.fspath(image), self.input_format)
        return super().__call__(as_uint8_image(image, self.input_format))
