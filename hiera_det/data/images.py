"""Reading images of any mode: `read_image_any` (files) and `as_uint8_image` (arrays) give the
8-bit 3-channel images Detectron2 models take, from gray, palette, CMYK, RGBA, 16-bit and float
images alike; `check_image_file` is the fast check (before evaluation) that a file will read;
`BadImageError` names a file that cannot be used. Policies in docs/reliability.md.
"""

from __future__ import annotations

import os

import numpy as np
from detectron2.data import detection_utils as utils
from PIL import Image

__all__ = ["BadImageError", "as_uint8_image", "check_image_file", "read_image_any"]


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


# EXIF orientations that Detectron2's `read_image` applies with a transpose or a 90-degree turn.
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
            orientation = image.getexif().get(utils._EXIF_ORIENT)
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
