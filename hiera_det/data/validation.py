"""COCO instances files checked before training: `validate_coco_json` **stops**
(`DatasetError`, naming the file and the annotation or image id) on what would make the run wrong
(malformed json, unknown category ids, annotations of unknown images, duplicate ids, a bbox that is
not 4 numbers, no image file at all) and **counts and reports** (with examples) what training will
skip (empty or degenerate polygons, empty boxes, boxes wholly outside their image, missing image
files). `find_annotation_problem` is the one definition of a bad annotation, shared with the
training-time `hiera_det.data.mapper.RobustDatasetMapper`. A test split's report speaks of
evaluation, and `check_test_images` checks every image of the test splits before the run
(`hiera_det.data.images.check_image_file`, in threads) and stops on any that would not read
(naming them), because evaluation does not skip images. Policies in docs/reliability.md.

A file is parsed once per process however often it is validated (registration in
`hiera_det.data.datasets` and train_net's check both validate it): what the checks learn from its
content is kept, keyed by a digest of the bytes (not by modification time, which may not change
when a file is rewritten within the file system's timestamp granularity). With ``cache_dir``, that
verdict (errors included) is also kept on disk, ``<cache_dir>/<sha256>-v<CHECK_VERSION>.json``, so
that a resumed or restarted run of an unchanged file only reads the file to digest it; whether the
image files exist is looked up every time. Files are parsed with simdjson
(pysimdjson) when it is installed, and the annotations' numbers screened as arrays; with the
standard library's json otherwise, and for what simdjson refuses but json reads (e.g. NaN), each
annotation checked in Python.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.structures.masks import polygon_area

from .images import BadImageError, check_image_file

try:
    import simdjson
except ImportError:  # the standard library's parser, and each annotation checked in Python
    simdjson = None

__all__ = [
    "DatasetError",
    "UnreadableImages",
    "ValidationReport",
    "check_test_images",
    "find_annotation_problem",
    "find_unreadable_images",
    "validate_coco_json",
    "validate_datasets",
]

logger = logging.getLogger(__name__)

_EXAMPLES = 5  # examples named per kind of problem in a report
_CACHED_FILES = 4  # checked contents kept (a run reads a train and a test file)
CHECK_VERSION = 1  # part of a kept verdict's name: raise it when the checks change
_LISTED_IMAGES = 20  # unreadable test images named in the message that stops the run
SKIP_UNREADABLE_OPTION = "dataset.skip_unreadable_test_images=True"


class DatasetError(ValueError):
    """A dataset problem that must be fixed before training (raised before the first step)."""


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
    if all(
        polygon_area(np.asarray(p[0::2], float), np.asarray(p[1::2], float)) <= 0 for p in polygons
    ):
        return "degenerate polygon", "zero area"
    return None


@dataclass
class ValidationReport:
    """What `validate_coco_json` found in a file that training can go on with.

    ``skipped_annotations``: problem -> annotation ids that training will skip;
    ``missing_images``: image file names not found (training skips those images);
    ``num_categories``: the length of the file's ``categories``;
    ``rle_masks``: ids of the annotations (not crowd) whose mask is an RLE, not polygons (they
    need ``instance_mask_format="bitmask"`` in the training mapper);
    ``used_for``: "training" or "evaluation" (a test split: its annotations are the ground truth
    as the json gives them, and its images are checked by `check_test_images`).
    """

    json_file: str
    num_images: int = 0
    num_annotations: int = 0
    skipped_annotations: dict[str, list] = field(default_factory=dict)
    missing_images: list[str] = field(default_factory=list)
    num_categories: int = 0
    rle_masks: list = field(default_factory=list)
    used_for: str = "training"

    @property
    def num_skipped_annotations(self) -> int:
        return sum(len(ids) for ids in self.skipped_annotations.values())

    def __str__(self) -> str:
        head = f"{self.json_file}: {self.num_images} images, {self.num_annotations} annotations; "
        if self.used_for == "training":
            head += (
                f"training skips {self.num_skipped_annotations} annotations and "
                f"{len(self.missing_images)} missing images"
            )
        else:
            head += (
                f"evaluation scores against all annotations as the json gives them, including "
                f"{self.num_skipped_annotations} that training would skip; "
                f"{len(self.missing_images)} missing images"
            )
        lines = [head]
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
    error = DatasetError(f"{json_file}: {what}. Fix the annotation file; training has not started.")
    error.problem = what  # what a kept verdict records (the file may be elsewhere next time)
    return error


@dataclass(frozen=True)
class _CheckedContent:
    """What the checks learn from a file's content alone (no file-system lookups)."""

    num_images: int
    num_annotations: int
    num_categories: int
    skipped_annotations: dict[str, tuple]
    rle_masks: tuple  # ids of the annotations (not crowd) whose mask is an RLE
    file_names: tuple[str, ...]
    image_ids: tuple[int, ...]
    image_sizes: tuple[tuple[int, int], ...]  # (width, height), as the json gives them


_checked: OrderedDict[bytes, _CheckedContent] = OrderedDict()  # digest -> content, LRU order


def _read_bytes(json_file: str) -> bytes:
    try:
        with open(json_file, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise DatasetError(f"annotation file not found: {json_file}") from e


def _parse(json_file: str, data: bytes):
    """The content of `data`: a simdjson document (read lazily: the checks take the numbers of
    the annotations as arrays, without a Python object each), or the standard library's parse
    where simdjson is missing or refuses what json reads (NaN, integers over 64 bits)."""
    if simdjson is not None:
        try:
            return simdjson.Parser().parse(data)
        except (ValueError, RuntimeError):
            pass  # json reads it, or names the problem
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(json_file, f"not valid JSON ({e})") from e


def _is_object(value) -> bool:
    return isinstance(value, dict) or (simdjson is not None and isinstance(value, simdjson.Object))


def _is_array(value) -> bool:
    return isinstance(value, list) or (simdjson is not None and isinstance(value, simdjson.Array))


def _python(value):
    """`value` as Python objects (a simdjson object or array converted; the rest as it is)."""
    if simdjson is not None and isinstance(value, simdjson.Object):
        return value.as_dict()
    if simdjson is not None and isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _top_level(json_file: str, content) -> tuple[list, list, list]:
    """(images, categories, annotations) of `content`, after checking that it is an object with
    these three lists; images and categories as Python objects, annotations as they are (simdjson
    objects stay lazy)."""
    if not _is_object(content):
        kind = "list" if _is_array(content) else type(content).__name__
        raise _fail(json_file, f"top level is a {kind}, not an object")
    for key in ("images", "annotations", "categories"):
        if not _is_array(content.get(key)):
            raise _fail(json_file, f"no {key!r} list (not a COCO instances file)")
    return _python(content["images"]), _python(content["categories"]), list(content["annotations"])


def _check_categories(json_file: str, categories: list) -> set[int]:
    """The category ids, after checking ``categories``."""
    if not categories:
        raise _fail(json_file, "'categories' is empty")
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise _fail(json_file, f"categories[{i}] = {cat!r} needs an integer 'id' and a 'name'")
    category_ids = [c["id"] for c in categories]
    duplicates = [i for i, n in Counter(category_ids).items() if n > 1]
    if duplicates:
        raise _fail(json_file, f"duplicate category ids {duplicates}")
    return set(category_ids)


def _check_images(json_file: str, images: list) -> dict[int, tuple[int, int]]:
    """Image id -> (width, height), after checking every image entry."""
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
    return sizes


def _check_annotations(
    json_file: str, annotations: list, sizes: dict[int, tuple[int, int]], known: set[int]
) -> tuple[dict[str, list], list]:
    """(problem -> ids of the annotations training skips, ids of the annotations (not crowd)
    whose mask is an RLE), after checking every annotation.

    `_screen_annotations` looks at all of them at once (numpy over columns of a simdjson
    document) and names the ones that might have a problem; only those go through
    `_check_annotation`, so the report is the one checking each would give. A file it cannot
    screen, or with a problem that stops the run, is checked one annotation at a time (the first
    problem in file order is the one named)."""
    suspects = _screen_annotations(annotations, sizes, known)
    if suspects is None:
        every = range(len(annotations))
        return _check_each_annotation(json_file, annotations, sizes, known, every)
    return _check_each_annotation(json_file, annotations, sizes, known, suspects, screened=True)


def _check_each_annotation(
    json_file: str,
    annotations: list,
    sizes: dict[int, tuple[int, int]],
    known: set[int],
    indices: Iterable[int],
    screened: bool = False,
) -> tuple[dict[str, list], list]:
    """`_check_annotations` for the annotations at `indices` (in order); `screened`: the ids,
    images and categories of all of them are known to be right."""
    skipped: dict[str, list] = {}
    rle_masks, seen_ids = [], set()
    for i in indices:
        ann = _python(annotations[i])
        if not isinstance(ann, dict):
            raise _fail(json_file, f"annotations[{i}] is a {type(ann).__name__}, not an object")
        ann_id = ann.get("id", f"#{i}")
        if not screened:
            _check_references(json_file, ann, ann_id, seen_ids, sizes, known)
        problem = _check_annotation(ann, *sizes[ann["image_id"]])
        if problem is not None and problem[0] == "bad bbox":  # Detectron2's loader would fail
            raise _fail(json_file, f"annotation id {ann_id}: bbox {problem[1]}")
        if problem is not None:
            skipped.setdefault(problem[0], []).append(ann_id)
        elif isinstance(ann.get("segmentation"), dict) and not ann.get("iscrowd"):
            rle_masks.append(ann_id)
    return skipped, rle_masks


def _check_references(json_file, ann: dict, ann_id, seen_ids: set, sizes, known) -> None:
    """Raise on a repeated annotation id, an unknown image id or an unknown category id."""
    if ann_id in seen_ids:
        raise _fail(json_file, f"duplicate annotation id {ann_id}")
    seen_ids.add(ann_id)
    if ann.get("image_id") not in sizes:
        raise _fail(
            json_file, f"annotation id {ann_id} refers to unknown image id {ann.get('image_id')!r}"
        )
    if ann.get("category_id") not in known:
        raise _fail(
            json_file,
            f"annotation id {ann_id} (image id {ann['image_id']}) has category_id "
            f"{ann.get('category_id')!r}, which is not in 'categories' "
            f"(ids {sorted(known)[:20]}{' ...' * (len(known) > 20)})",
        )


_SCREEN_CHUNK = 50_000  # annotations screened at once (bounds the memory of the columns)
_AREA_MARGIN = 1e-6  # polygons with |area| this small are checked one by one (rounding)


def _screen_annotations(annotations: list, sizes: dict, known: set[int]) -> list[int] | None:
    """Indices of the annotations that `_check_annotation` might reject, a superset of them;
    None when each annotation must be checked in Python: they are not simdjson objects, or not
    all with unique ids, known images and categories, 4-number bboxes and no bbox_mode."""
    if simdjson is None or not all(isinstance(a, simdjson.Object) for a in annotations):
        return None
    suspects: list[int] = []
    seen_ids: set = set()
    for start in range(0, len(annotations), _SCREEN_CHUNK):
        columns = _Columns.of(annotations[start : start + _SCREEN_CHUNK])
        if columns is None or not columns.references_known(seen_ids, sizes, known):
            return None
        suspects += [start + i for i in columns.suspects(sizes)]
    return suspects


@dataclass
class _Columns:
    """The numbers of a chunk of annotations as arrays: boxes, and the polygons' coordinates one
    after the other, with the annotation each polygon belongs to (`owners`) and its length;
    `odd`: annotations whose segmentation is not a list of number lists (checked one by one)."""

    ids: list
    image_ids: list
    category_ids: list
    boxes: np.ndarray
    coords: np.ndarray
    owners: np.ndarray
    lengths: np.ndarray
    odd: list[int]

    @staticmethod
    def of(chunk: list) -> _Columns | None:
        """The columns of `chunk` (simdjson objects), or None when a bbox is not 4 numbers or an
        annotation has a bbox_mode (each is then checked in Python)."""
        ids, image_ids, category_ids, boxes, odd, owners, polygons = [], [], [], [], [], [], []
        try:
            for i, ann in enumerate(chunk):
                bbox = ann.get("bbox")
                has_mode = "bbox_mode" in ann.keys()  # a lookup that misses costs 10x more
                if has_mode or not isinstance(bbox, simdjson.Array) or len(bbox) != 4:
                    return None
                boxes.append(bbox.as_buffer(of_type="d"))
                ids.append(ann.get("id"))
                image_ids.append(ann.get("image_id"))
                category_ids.append(ann.get("category_id"))
                if not _add_polygons(ann.get("segmentation"), polygons):
                    odd.append(i)
                owners += [i] * (len(polygons) - len(owners))
        except TypeError:  # a bbox value that is not a number
            return None
        return _Columns(
            ids, image_ids, category_ids,
            boxes=np.frombuffer(b"".join(boxes), dtype=np.float64).reshape(-1, 4),
            coords=np.frombuffer(b"".join(polygons), dtype=np.float64),
            owners=np.asarray(owners, dtype=np.int64),
            lengths=np.asarray([memoryview(p).nbytes // 8 for p in polygons], dtype=np.int64),
            odd=odd,
        )  # fmt: skip

    def references_known(self, seen_ids: set, sizes: dict, known: set[int]) -> bool:
        """Ids present and unique (also across the chunks seen before), images and categories
        known."""
        if not all(type(i) in (int, str) for i in self.ids):
            return False
        ids = set(self.ids)
        if len(ids) != len(self.ids) or not seen_ids.isdisjoint(ids):
            return False
        seen_ids |= ids
        return all(i in sizes for i in self.image_ids) and all(
            c in known for c in self.category_ids
        )

    def suspects(self, sizes: dict) -> list[int]:
        """Indices (in the chunk) of the annotations `_check_annotation` might reject."""
        if not np.isfinite(self.boxes).all():
            return list(range(len(self.ids)))
        wh = np.asarray([sizes[i] for i in self.image_ids], dtype=np.float64).reshape(-1, 2)
        x0, y0, w, h = self.boxes.T
        bad = (
            (w <= 0)
            | (h <= 0)
            | (x0 >= wh[:, 0])
            | (y0 >= wh[:, 1])
            | (x0 + w <= 0)
            | (y0 + h <= 0)
        )
        areas, scales = _polygon_areas(self.coords, self.lengths)
        lengths = self.lengths
        ok = (lengths >= 6) & (lengths % 2 == 0) & (areas > _AREA_MARGIN * (1 + scales))
        has_polygon = np.zeros(len(self.ids), dtype=bool)
        has_polygon[self.owners] = True
        has_good = np.zeros(len(self.ids), dtype=bool)
        has_good[self.owners[ok]] = True
        bad |= has_polygon & ~has_good
        bad[self.odd] = True
        return np.flatnonzero(bad).tolist()


def _add_polygons(segmentation, polygons: list[bytes]) -> bool:
    """Add the coordinates of each polygon of `segmentation` to `polygons` (as float64 bytes);
    False (adding nothing) when it is not a non-empty list of number lists: an RLE, other kinds,
    bools or strings among the numbers (checked one by one: they are few)."""
    if segmentation is None:
        return True
    if not isinstance(segmentation, simdjson.Array) or not len(segmentation):
        return False
    found = []
    for polygon in segmentation:
        if not isinstance(polygon, simdjson.Array):
            return False
        try:
            found.append(polygon.as_buffer(of_type="d"))
        except TypeError:
            return False
    polygons += found
    return True


def _polygon_areas(coords: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|area|, scale) of each polygon of `coords` (their x, y pairs one after the other, each
    polygon `lengths` values long): the area by the shoelace formula Detectron2's `polygon_area`
    uses, the scale the largest |coordinate| squared (for the area's rounding margin). NaN for
    polygons of an odd number of values or none, and where a coordinate is not finite."""
    areas, scales = np.full(len(lengths), np.nan), np.full(len(lengths), np.nan)
    whole = (lengths % 2 == 0) & (lengths > 0)
    if not whole.any():
        return areas, scales
    xy = coords[np.repeat(whole, lengths)].reshape(-1, 2)
    points = lengths[whole] // 2
    first = np.concatenate([[0], np.cumsum(points)[:-1]])
    following = np.arange(len(xy)) + 1
    following[first + points - 1] = first  # each polygon closes on its own first point
    x, y = xy[:, 0], xy[:, 1]
    cross = x * y[following] - x[following] * y
    areas[whole] = 0.5 * np.abs(np.add.reduceat(cross, first))
    scales[whole] = np.maximum.reduceat(np.maximum(np.abs(x), np.abs(y)), first) ** 2
    return areas, scales


def _check_content(json_file: str, content) -> _CheckedContent:
    """Check the parsed `content` of `json_file` (raises `DatasetError`)."""
    images, categories, annotations = _top_level(json_file, content)
    known = _check_categories(json_file, categories)
    sizes = _check_images(json_file, images)
    skipped, rle_masks = _check_annotations(json_file, annotations, sizes, known)
    return _CheckedContent(
        num_images=len(images),
        num_annotations=len(annotations),
        num_categories=len(categories),
        skipped_annotations={k: tuple(v) for k, v in skipped.items()},
        rle_masks=tuple(rle_masks),
        file_names=tuple(img["file_name"] for img in images),
        image_ids=tuple(img["id"] for img in images),
        image_sizes=tuple((img["width"], img["height"]) for img in images),
    )


def _kept_path(cache_dir: str, digest: bytes) -> str:
    return os.path.join(cache_dir, f"{digest.hex()}-v{CHECK_VERSION}.json")


def _read_kept(json_file: str, path: str) -> _CheckedContent | None:
    """The verdict kept at `path` (raising its `DatasetError` again), or None when there is none
    that reads (none yet, or not written by this version of the checks: check again)."""
    try:
        with open(path, "rb") as f:
            kept = json.loads(f.read())
        if "problem" not in kept:
            verdict = _CheckedContent(
                **{k: kept[k] for k in ("num_images", "num_annotations", "num_categories")},
                skipped_annotations={k: tuple(v) for k, v in kept["skipped_annotations"].items()},
                rle_masks=tuple(kept["rle_masks"]),
                file_names=tuple(kept["file_names"]),
                image_ids=tuple(kept["image_ids"]),
                image_sizes=tuple(tuple(wh) for wh in kept["image_sizes"]),
            )
        else:
            verdict = _fail(json_file, str(kept["problem"]))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    logger.info(f"{json_file}: checked before, verdict kept in {path}")
    if isinstance(verdict, DatasetError):
        raise verdict
    return verdict


def _keep(path: str, verdict: _CheckedContent | DatasetError) -> None:
    """Write `verdict` to `path` atomically (a temporary file renamed over it)."""
    if isinstance(verdict, DatasetError):
        kept = {"problem": verdict.problem}
    else:
        kept = {f: getattr(verdict, f) for f in _CheckedContent.__dataclass_fields__}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(kept, f)
    os.replace(tmp, path)


def _check_and_keep(json_file: str, content, kept: str | None) -> _CheckedContent:
    """`_check_content`; its verdict, error included, kept at `kept` (unless None)."""
    try:
        checked = _check_content(json_file, content)
    except DatasetError as error:
        if kept is not None:
            _keep(kept, error)
        raise
    if kept is not None:
        _keep(kept, checked)
    return checked


def _checked_content(json_file: str, cache_dir: str | None = None) -> _CheckedContent:
    """Parse and check `json_file`, or take what an earlier call (this process's, or one kept in
    `cache_dir`) learnt from the same bytes."""
    data = _read_bytes(json_file)
    digest = hashlib.sha256(data).digest()
    kept = None if cache_dir is None else _kept_path(cache_dir, digest)
    if digest in _checked:
        _checked.move_to_end(digest)
        if kept is not None and not os.path.exists(kept):
            _keep(kept, _checked[digest])  # checked in this process for another folder
        return _checked[digest]
    checked = None if kept is None else _read_kept(json_file, kept)
    if checked is None:
        start, size_mb = time.perf_counter(), len(data) / 2**20
        content = _parse(json_file, data)
        del data  # the parsed content is all the checks need
        checked = _check_and_keep(json_file, content, kept)
        del content
        seconds = time.perf_counter() - start
        logger.info(f"{json_file}: parsed ({size_mb:.0f} MB) and checked in {seconds:.1f} s")
    _checked[digest] = checked
    while len(_checked) > _CACHED_FILES:
        _checked.popitem(last=False)
    return checked


def validate_coco_json(
    json_file: str,
    image_root: str | None = None,
    check_files: bool = True,
    cache_dir: str | None = None,
) -> ValidationReport:
    """Check a COCO instances file before training; see the module docstring for the policy.

    Args:
        json_file: the instances json.
        image_root: folder the images' ``file_name`` are relative to (for `check_files`).
        check_files: look for every image file (one directory listing per folder).
        cache_dir: folder where the verdict on the file's content is kept, by its digest
            (None: in this process only).

    Raises:
        DatasetError: a problem that stops training, naming the file and the ids at fault.
    """
    checked = _checked_content(json_file, cache_dir)
    report = ValidationReport(
        json_file,
        checked.num_images,
        checked.num_annotations,
        {problem: list(ids) for problem, ids in checked.skipped_annotations.items()},
        num_categories=checked.num_categories,
        rle_masks=list(checked.rle_masks),
    )
    names = checked.file_names
    if check_files and image_root is not None and names:
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
    names: str | Iterable[str],
    check_files: bool = True,
    used_for: str = "training",
    cache_dir: str | None = None,
) -> list[ValidationReport]:
    """`validate_coco_json` for each named dataset registered from a COCO json (Detectron2's
    `register_coco_instances`, built-in COCO); others are left alone. Logs each report, worded for
    `used_for` ("training" or "evaluation"); verdicts kept in `cache_dir` (None: not on disk)."""
    if used_for not in ("training", "evaluation"):
        raise ValueError(f"used_for must be 'training' or 'evaluation', got {used_for!r}")
    reports = []
    for name in _names(names):
        meta = MetadataCatalog.get(name)
        json_file = meta.get("json_file")
        if not json_file or not os.path.isfile(json_file):
            continue  # not a COCO-json dataset, or generated on first use
        report = validate_coco_json(json_file, meta.get("image_root"), check_files, cache_dir)
        report.used_for = used_for
        (
            logger.warning
            if report.num_skipped_annotations or report.missing_images
            else logger.info
        )(f"dataset {name!r}: {report}")
        reports.append(report)
    return reports


def _names(names: str | Iterable[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


@dataclass
class UnreadableImages:
    """What `find_unreadable_images` found in one dataset.

    ``problems``: (image id, path, message naming the file) of each image reading would fail on;
    ``image_ids``: the ids of all ``num_images`` images (None where a dataset gives none);
    ``source``: the json the images came from (or the dataset name when it has no json).
    """

    dataset: str
    source: str
    num_images: int
    problems: list[tuple[int | None, str, str]] = field(default_factory=list)
    image_ids: list[int | None] = field(default_factory=list)

    def __str__(self) -> str:
        shown = [f"  {message}" for _, _, message in self.problems[:_LISTED_IMAGES]]
        if len(self.problems) > _LISTED_IMAGES:
            shown.append(f"  ... and {len(self.problems) - _LISTED_IMAGES} more")
        return "\n".join(
            [
                f"dataset {self.dataset!r} ({self.source}): {len(self.problems)} of its "
                f"{self.num_images} images cannot be read:",
                *shown,
            ]
        )


def _images_of(name: str) -> tuple[str, list[tuple[int | None, str, int | None, int | None]]]:
    """(source, [(image id, path, width, height)]) of a registered dataset: from the checked json
    for a COCO-json dataset (parsed once, see the module docstring), else from its dicts."""
    meta = MetadataCatalog.get(name)
    json_file = meta.get("json_file")
    if json_file and os.path.isfile(json_file) and meta.get("image_root") is not None:
        checked = _checked_content(json_file)
        root = meta.image_root
        return json_file, [
            (i, os.path.join(root, f), w, h)
            for i, f, (w, h) in zip(checked.image_ids, checked.file_names, checked.image_sizes)
        ]
    dicts = DatasetCatalog.get(name)
    return name, [
        (d.get("image_id"), d["file_name"], d.get("width"), d.get("height")) for d in dicts
    ]


def _problem(entry: tuple[int | None, str, int | None, int | None]) -> str | None:
    try:
        check_image_file(*entry[1:])
    except BadImageError as e:
        return str(e)
    return None


def find_unreadable_images(name: str, num_threads: int | None = None) -> UnreadableImages:
    """Check every image of the registered dataset `name` with `check_image_file`, in
    `num_threads` threads (None: Python's default pool size; the check mostly waits for the
    disk and for PIL's C code, which runs outside the GIL)."""
    source, entries = _images_of(name)
    with ThreadPoolExecutor(num_threads) as pool:
        problems = list(pool.map(_problem, entries, chunksize=64))
    return UnreadableImages(
        name,
        source,
        len(entries),
        [(entry[0], entry[1], p) for entry, p in zip(entries, problems) if p is not None],
        [entry[0] for entry in entries],
    )


def check_test_images(
    names: str | Iterable[str], skip_unreadable: bool = False
) -> list[UnreadableImages]:
    """`find_unreadable_images` for each test dataset, before training or evaluation starts.

    Returns the findings of the datasets with unreadable images (empty when all read).

    Raises:
        DatasetError: some image cannot be read and `skip_unreadable` is False: one message
            naming each file (the first 20 per dataset, and the count), its json, and the
            choices (fix the files, or evaluate without them with `SKIP_UNREADABLE_OPTION`).
    """
    found = [f for f in map(find_unreadable_images, _names(names)) if f.problems]
    if not found:
        return []
    if skip_unreadable:
        for f in found:
            logger.warning(f"{f}\nEvaluation leaves them out ({SKIP_UNREADABLE_OPTION})")
        return found
    raise DatasetError(
        "\n".join(
            [
                "Evaluation would stop at these images (it does not skip images: the AP would "
                "change):",
                *map(str, found),
                "Fix or replace these files (or remove their entries from the json), or evaluate "
                f"without them: {SKIP_UNREADABLE_OPTION} (the AP tables then say how many images "
                "were left out). Nothing has been trained or evaluated yet.",
            ]
        )
    )
