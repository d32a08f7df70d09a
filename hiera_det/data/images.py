"""Images: reading, checking, listing, and what training does with one that cannot be used.

- `read_image_any` (files) and `as_uint8_image` (arrays) give the 8-bit 3-channel images models
  take, from gray, palette, CMYK, RGBA, 16-bit and float images alike, EXIF orientation applied;
- `check_image_file` is the fast check (before evaluation) that a file will read;
- `IMAGE_EXTENSIONS`, `list_images` and `count_images` find the images of a folder (MAE's image
  folder, demo.py's input folders);
- `BadImageSkipper` is training's one policy for an image that cannot be used (detection's
  `RobustDatasetMapper`, MAE's `ImageFolder`): skip it, warn naming the file with a running count,
  stop when too many in a row fail;
- `BadImageError` names a file that cannot be used.

Policies in docs/reliability.md.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from PIL import ExifTags, Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "BadImageSkipper",
    "as_uint8_image",
    "check_image_file",
    "count_images",
    "list_images",
    "read_image_any",
]

logger = logging.getLogger(__name__)

# Lower case, matched case-insensitively (ImageNet's .JPEG); PIL reads all of them.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

Loaded = TypeVar("Loaded")  # what `BadImageSkipper.read`'s `load` returns


class BadImageError(OSError):
    """An image file that cannot be used: missing, truncated, corrupt or of the wrong size."""


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
    clipped at 255; EXIF orientation is applied as it applies it (PIL's `ImageOps.exif_transpose`,
    the same pixels for all 8 orientations). Gray, palette, CMYK and RGBA (alpha dropped) images
    become 3-channel.

    Raises:
        BadImageError: the file is missing, truncated or not an image (naming the file).
    """
    if format not in ("BGR", "RGB"):
        raise ValueError(f"format must be 'BGR' or 'RGB', got {format!r}")
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()  # decodes everything now: a truncated file fails here, not later
            ImageOps.exif_transpose(image, in_place=True)
    except FileNotFoundError as e:
        raise BadImageError(f"image file not found: {path}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... depending on format
        raise BadImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
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


# EXIF orientations applied with a transpose or a 90-degree turn (`ImageOps.exif_transpose`).
_SWAPS_SIDES = (5, 6, 7, 8)
_JPEG_END = b"\xff\xd9"  # the end-of-image marker


def _decodes(image: Image.Image, f) -> None:
    """Decode `image` (open on `f`), a JPEG at 1/8 of each side, unless it is a JPEG that ends
    with its end-of-image marker (then only a cut inside the stream can make the decode fail)."""
    if image.format == "JPEG":
        f.seek(-len(_JPEG_END), os.SEEK_END)
        if f.read() == _JPEG_END:
            return
        # Truncated, or bytes after the marker (which decode fine): decoding tells them apart.
        # DCT scaling still reads the whole entropy-coded stream, at about a third of the time.
        image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
    image.load()


def check_image_file(path: str, width: int | None = None, height: int | None = None) -> None:
    """Raise `BadImageError` if Detectron2's `read_image` + `check_image_size` would fail on `path`.

    A fast check, not a read: the header is parsed (a missing, empty or non-image file fails), a
    JPEG must end with its end-of-image marker or else decode (at reduced size: a truncated file
    fails), other formats are decoded. PIL's ``verify()`` passes a truncated JPEG. `width` and
    `height` (the dataset's, if given) are compared with the size after EXIF orientation, as
    Detectron2 compares them. Not caught: a JPEG corrupted inside its stream that still ends with
    the marker and that libjpeg cannot decode (measured, with the timings, in
    docs/reliability.md); reading it fails later, naming the file.

    Raises:
        BadImageError: naming the file and what is wrong with it.
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            size = image.size  # before `draft` makes it smaller
            orientation = image.getexif().get(ExifTags.Base.Orientation)
            _decodes(image, f)
    except FileNotFoundError as e:
        raise BadImageError(f"image file not found: {path}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... depending on format
        raise BadImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if orientation in _SWAPS_SIDES:
        size = size[::-1]
    if width is not None and height is not None and size != (width, height):
        raise BadImageError(
            f"image {path} is {size[0]}x{size[1]} (width x height, after EXIF orientation); its "
            f"dataset says {width}x{height}"
        )


def list_images(root: str) -> list[str]:
    """Every image file (`IMAGE_EXTENSIONS`) under the folder `root`: recursive (symlinks
    followed), hidden files and folders left out, sorted by path, each path under
    ``os.path.abspath(root)``. The listing is cached per process: an epoch-based schedule and the
    dataset both ask for it, and walking ImageNet takes seconds.

    Raises:
        FileNotFoundError: `root` is not a folder, or holds no image file (naming it).
    """
    return list(_list_images_cached(os.path.abspath(os.path.expanduser(root)), root))


def count_images(root: str) -> int:
    """The number of images `list_images` finds under `root`."""
    return len(list_images(root))


@functools.lru_cache(maxsize=8)
def _list_images_cached(root: str, shown: str) -> tuple[str, ...]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder '{shown}' does not exist")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        paths += [
            os.path.join(dirpath, f)
            for f in filenames
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        ]
    if not paths:
        kinds = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
        raise FileNotFoundError(f"no images ({kinds}) in folder '{shown}'")
    return tuple(sorted(paths))


class BadImageSkipper:
    """Training's policy for an image that cannot be used: skip it, warn, stop after too many.

    Args:
        max_consecutive_failures: raise when this many images in a row could not be used: then
            the data is broken (a wrong folder, an unmounted disk), not a few files.

    ``skipper.read(path, load)`` returns ``load(path)``, or None when that raises
    `BadImageError`: the caller returns None in turn and `hiera_det.data.sampling.SeededMapDataset`
    draws another image from the sample's seed (so a resumed run replaces it the same way). Each
    skip is logged with the error (which names the file) and the count of this process; each
    loader worker has its own copy, hence its own count.
    """

    def __init__(self, max_consecutive_failures: int = 100):
        self.max_consecutive_failures = max_consecutive_failures
        self.num_skipped = 0
        self.consecutive_failures = 0

    def read(self, path: str, load: Callable[[str], Loaded]) -> Loaded | None:
        try:
            result = load(path)
        except BadImageError as e:
            self.num_skipped += 1
            self.consecutive_failures += 1
            logger.warning(
                f"Skipped image: {e} ({self.num_skipped} images skipped so far by this process)"
            )
            if self.consecutive_failures >= self.max_consecutive_failures:
                raise RuntimeError(
                    f"{self.consecutive_failures} images in a row could not be read (the last: "
                    f"{path}); the image folder or the annotation file is wrong"
                ) from e
            return None
        self.consecutive_failures = 0
        return result
