"""A built-in instance segmentation dataset: shapes on textured backgrounds, made from a seed.

Each image holds a few filled shapes of several classes (circle, rectangle, triangle, star, cross)
in random colours, sizes and rotations, drawn one after another on a smooth, noisy background.
Later shapes occlude earlier ones and every instance mask is *exactly* the set of pixels its shape
still owns after occlusion (no anti-aliasing, lossless PNG), stored as COCO RLE. An instance that
ends up too small or mostly hidden is removed and the image is redrawn without it, so every visible
shape is labelled.

Everything is a pure function of a `SyntheticSpec` (its `seed` included): image ``i`` of a split is
drawn from its own generator ``default_rng([seed, split, i])``, so files are byte-identical across
runs and machines with the same library versions. `ensure_synthetic` writes the dataset once and
leaves a stamp (generator version + spec); it regenerates only when either changes.

Layout under ``root``::

    stamp.json
    annotations/instances_{train,val}.json
    train/000000.png ...
    val/000000.png ...

Use it from Python (`register_synthetic`, then the Detectron2 names ``synthetic_train`` and
``synthetic_val``) or from the shell::

    python -m hiera_det.data.synthetic --output datasets/synthetic
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from iopath.common.file_io import file_lock
from pycocotools import mask as mask_util
from tqdm import tqdm

__all__ = [
    "GENERATOR_VERSION",
    "SHAPES",
    "SyntheticSpec",
    "default_root",
    "draw_image",
    "ensure_synthetic",
    "is_cached",
    "register_synthetic",
]

# Bump when the drawing changes, so that cached datasets are regenerated.
GENERATOR_VERSION = 1

SHAPES = ("circle", "rectangle", "triangle", "star", "cross")
SPLITS = ("train", "val")
_SHIFT = 4  # cv2 fixed-point bits: polygon vertices at 1/16 px, edges still hard (LINE_8)


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines the dataset; two equal specs give byte-identical files.

    Args:
        num_train, num_val: images per split.
        image_size: (height, width) in pixels.
        shapes: class names, a subset of `SHAPES`, in category-id order.
        objects: (min, max) shapes drawn per image (before removing hidden ones).
        object_size: (min, max) shape diameter as a fraction of the shorter image side.
        min_area: an instance must keep at least this many pixels ...
        min_visible: ... and at least this fraction of its unoccluded area.
        noise: standard deviation of the per-pixel Gaussian noise (0-255 scale).
        seed: the random seed.
    """

    num_train: int = 2000
    num_val: int = 200
    image_size: tuple[int, int] = (128, 128)
    shapes: tuple[str, ...] = SHAPES
    objects: tuple[int, int] = (2, 7)
    object_size: tuple[float, float] = (0.12, 0.45)
    min_area: int = 20
    min_visible: float = 0.3
    noise: float = 6.0
    seed: int = 0

    def __post_init__(self):
        # Normalise sequences so that specs built from lists / json compare and hash equal.
        for name in ("image_size", "shapes", "objects", "object_size"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = set(self.shapes) - set(SHAPES)
        if unknown or not self.shapes:
            raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {self.shapes}")
        if not 1 <= self.objects[0] <= self.objects[1]:
            raise ValueError(f"objects={self.objects} must be (min, max) with 1 <= min <= max")
        if not 0 < self.object_size[0] <= self.object_size[1] <= 1:
            raise ValueError(f"object_size={self.object_size} must be fractions, min <= max")

    def num_images(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val}[split]

    def stamp(self) -> dict:
        """The cache key, json-normalised (tuples become lists) so it compares equal to a reload."""
        stamp = {"generator_version": GENERATOR_VERSION, "spec": dataclasses.asdict(self)}
        return json.loads(json.dumps(stamp))


def default_root() -> Path:
    """``$DETECTRON2_DATASETS/synthetic``; ``./datasets/synthetic`` by default (as Detectron2)."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets")) / "synthetic"


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


def _outline(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices of a shape of diameter ~2 centred at 0 (before rotation), ``[N, 2]`` as (x, y)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "rectangle":
        a = rng.uniform(0.45, 1.0)  # aspect ratio: squares to 2:1 bars
        return np.array([[-1, -a], [1, -a], [1, a], [-1, a]], dtype=np.float64)
    if shape == "triangle":  # a random triangle with all vertices on the unit circle, none thin
        t = np.pi / 2 + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.35, 0.35, 3)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "star":
        n = int(rng.integers(5, 7))
        r = np.tile([1.0, rng.uniform(0.4, 0.55)], n)
        t = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if shape == "cross":
        w = rng.uniform(0.25, 0.4)  # arm half-width
        return np.array(
            [
                [-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w],
                [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w],
            ],
            dtype=np.float64,
        )  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth two-colour gradient plus low-frequency blotches, ``[h, w, 3]`` float32."""
    c0, c1 = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h) * 0.5 + 0.5  # in [0, 1] roughly
    img = c0 + (c1 - c0) * np.clip(t, 0, 1)[..., None]
    blotches = rng.normal(0, 18, (4, 4, 3)).astype(np.float32)
    img += cv2.resize(blotches, (w, h), interpolation=cv2.INTER_CUBIC)
    return img.astype(np.float32)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An object's appearance over the whole canvas (cut by its mask later): colour + shading."""
    colour = rng.uniform(0, 255, 3)
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # flat
        pattern = np.zeros((h, w), np.float32)
    elif kind == 1:  # linear shading
        a = rng.uniform(0, 2 * np.pi)
        pattern = 30 * (np.cos(a) * xx + np.sin(a) * yy) / max(h, w)
    else:  # stripes
        a, period = rng.uniform(0, 2 * np.pi), rng.uniform(4, 10)
        pattern = 25 * np.sign(np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) / period))
    return colour.astype(np.float32) + pattern[..., None]


def draw_image(
    spec: SyntheticSpec, rng: np.random.Generator
) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """Draw one image: ``(image [H, W, 3] uint8 RGB, class indices, masks [H, W] bool)``.

    Masks are disjoint and exact: a mask's pixels are those its shape covers after all later
    shapes are drawn over it, and the image shows every labelled shape and no unlabelled one.
    """
    h, w = spec.image_size
    side = min(h, w)
    n = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    classes, full_masks, textures = [], [], []
    for _ in range(n):
        cls = int(rng.integers(len(spec.shapes)))
        diameter = rng.uniform(*spec.object_size) * side
        angle = rng.uniform(0, 2 * np.pi)
        # Shapes may cross the border (and get cut there), but keep their centre a quarter
        # diameter inside so that a recognisable part stays in view.
        centre = rng.uniform([diameter / 4] * 2, [w - diameter / 4, h - diameter / 4])
        pts = _outline(spec.shapes[cls], rng)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pts = (pts @ rot.T) * (diameter / 2) + centre
        canvas = np.zeros((h, w), np.uint8)
        fixed = np.round(pts * (1 << _SHIFT)).astype(np.int32)
        cv2.fillPoly(canvas, [fixed], 1, lineType=cv2.LINE_8, shift=_SHIFT)
        classes.append(cls)
        full_masks.append(canvas.astype(bool))
        textures.append(_texture(rng, h, w))
    background = _background(rng, h, w)
    noise = rng.normal(0, spec.noise, (h, w, 3)).astype(np.float32)

    # Drop shapes that end up too small or too hidden, then re-resolve occlusion without them
    # (removing a shape can reveal more of the ones below it), until every kept shape qualifies.
    keep = [i for i in range(n) if full_masks[i].any()]
    while True:
        owner = np.full((h, w), -1, np.int32)
        for i in keep:  # later shapes are drawn on top
            owner[full_masks[i]] = i
        areas = {i: int((owner == i).sum()) for i in keep}
        ok = [
            i
            for i in keep
            if areas[i] >= spec.min_area and areas[i] >= spec.min_visible * full_masks[i].sum()
        ]
        if ok == keep:
            break
        keep = ok

    image = background
    for i in keep:
        visible = owner == i
        image[visible] = textures[i][visible]
    image = np.clip(image + noise, 0, 255).round().astype(np.uint8)
    return image, [classes[i] for i in keep], [owner == i for i in keep]


# ----------------------------------------------------------------------------------------------
# Writing, caching, registration
# ----------------------------------------------------------------------------------------------


def _annotation_json(spec: SyntheticSpec, split: str, root: Path, progress: bool) -> dict:
    split_id = SPLITS.index(split)
    h, w = spec.image_size
    images, annotations = [], []
    out_dir = root / split
    out_dir.mkdir(parents=True)
    num = spec.num_images(split)
    for idx in tqdm(range(num), desc=f"synthetic {split}", unit="img", disable=not progress):
        rng = np.random.default_rng([spec.seed, split_id, idx])
        image, classes, masks = draw_image(spec, rng)
        file_name = f"{idx:06d}.png"
        if not cv2.imwrite(str(out_dir / file_name), image[:, :, ::-1]):  # cv2 writes BGR
            raise OSError(f"could not write {out_dir / file_name}")
        images.append({"id": idx + 1, "file_name": file_name, "height": h, "width": w})
        for cls, m in zip(classes, masks):
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": idx + 1,
                    "category_id": cls + 1,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                    "area": float(m.sum()),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],  # tight [x, y, w, h]
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(spec.shapes)
    ]
    return {
        "info": {"description": f"hiera_det synthetic shapes ({split})", **spec.stamp()},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def is_cached(spec: SyntheticSpec, root: str | os.PathLike) -> bool:
    """Whether `root` holds the complete dataset of `spec` (its stamp matches)."""
    stamp_file = Path(root) / "stamp.json"
    try:
        return json.loads(stamp_file.read_text()) == spec.stamp()
    except (OSError, json.JSONDecodeError):  # no stamp, or a damaged one
        return False


def ensure_synthetic(
    spec: SyntheticSpec | None = None,
    root: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write the dataset of `spec` under `root` unless a matching one is already there.

    The cache key is ``stamp.json`` (generator version + spec), written last: an interrupted
    run leaves no stamp and is redone. Returns the root.
    """
    spec = spec or SyntheticSpec()
    root = Path(root) if root is not None else default_root()
    if not force and is_cached(spec, root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # One process writes, the others (ranks of one run) wait and then find the dataset made;
    # the lock is the file `<root>.lock` beside the dataset.
    with file_lock(str(root)):
        if force or not is_cached(spec, root):
            _write_synthetic(spec, root, progress)
    return root


def _write_synthetic(spec: SyntheticSpec, root: Path, progress: bool) -> None:
    # Regenerate from scratch so that no file of an older spec survives.
    (root / "stamp.json").unlink(missing_ok=True)
    for sub in (*SPLITS, "annotations"):
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / "annotations").mkdir(parents=True)
    for split in SPLITS:
        coco = _annotation_json(spec, split, root, progress)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    (root / "stamp.json").write_text(json.dumps(spec.stamp(), indent=2))


def register_synthetic(
    spec: SyntheticSpec | None = None,
    root: str | os.PathLike | None = None,
    prefix: str = "synthetic",
) -> tuple[str, str]:
    """Register ``{prefix}_train`` and ``{prefix}_val`` with Detectron2; returns the two names.

    This is `register_coco_instances` except that the dataset is generated (or found in the
    cache) when Detectron2 first asks for its dicts: registering is free and writes nothing, so a
    config can register at load time. Until the files exist, the metadata has no ``json_file`` /
    ``image_root`` (so file checks do not fail on a dataset that will be made on demand, and a
    `COCOEvaluator` built before the dicts would convert them itself); both are set as soon as the
    files exist. Registering the same names again replaces the earlier registration.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    spec = spec or SyntheticSpec()
    root = Path(root) if root is not None else default_root()
    files = {
        split: {
            "json_file": str(root / "annotations" / f"instances_{split}.json"),
            "image_root": str(root / split),
        }
        for split in SPLITS
    }
    names = {split: f"{prefix}_{split}" for split in SPLITS}

    def load(split: str) -> list[dict]:
        ensure_synthetic(spec, root)
        for s in SPLITS:  # both splits exist now
            MetadataCatalog.get(names[s]).set(**files[s])
        return load_coco_json(files[split]["json_file"], files[split]["image_root"], names[split])

    cached = is_cached(spec, root)
    for split, name in names.items():
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda split=split: load(split))
        MetadataCatalog.get(name).set(
            evaluator_type="coco",
            thing_classes=list(spec.shapes),
            # load_coco_json sets the same mapping; set it now for users that never load the dicts
            # (e.g. the demo drawing class names)
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(spec.shapes))},
            **(files[split] if cached else {}),
        )
    return names["train"], names["val"]


def main(argv: Sequence[str] | None = None) -> None:
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(
        prog="python -m hiera_det.data.synthetic", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", default=None, help=f"root folder (default: {default_root()})")
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-val", type=int, default=defaults.num_val)
    parser.add_argument("--image-size", type=int, nargs=2, default=defaults.image_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--force", action="store_true", help="regenerate even if cached")
    args = parser.parse_args(argv)
    spec = dataclasses.replace(
        defaults,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=tuple(args.image_size),
        seed=args.seed,
    )
    root = ensure_synthetic(spec, args.output, force=args.force)
    print(f"synthetic dataset ready in {root}")


if __name__ == "__main__":
    main()
