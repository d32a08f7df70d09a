"""Reading images (hiera_det.data.images): every mode to 8-bit 3-channel images, EXIF as
Detectron2 applies it, bad files named, and the fast check before evaluation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from hiera_det.data.images import (
    BadImageError,
    as_uint8_image,
    check_image_file,
    read_image_any,
)


def test_read_image_any_modes(tmp_path):
    ramp = np.linspace(0, 65535, 40 * 50).reshape(40, 50).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "gray16.png"), ramp)
    out = read_image_any(str(tmp_path / "gray16.png"), "RGB")
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    # Scaled (65535 -> 255, 32768 -> 128), not clipped at 255 as PIL's convert("RGB") does.
    np.testing.assert_allclose(out[:, :, 0], ramp / 257.0, atol=0.51)
    assert out.min() == 0 and out.max() == 255

    color = np.zeros((20, 30, 3), np.uint8)
    color[..., 0], color[..., 1], color[..., 2] = 10, 100, 200  # RGB
    Image.fromarray(np.dstack([color, np.full((20, 30), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(color[..., 1]).save(tmp_path / "gray.jpg", quality=100)
    Image.fromarray(color).convert("P", palette=Image.Palette.ADAPTIVE).save(
        tmp_path / "palette.png"
    )
    Image.fromarray(color).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(color[:1, :1]).save(tmp_path / "one_pixel.png")
    rgba = read_image_any(str(tmp_path / "rgba.png"), "RGB")
    assert (rgba == color).all()  # alpha dropped, colours kept
    assert (read_image_any(str(tmp_path / "rgba.png"), "BGR") == color[..., ::-1]).all()
    gray = read_image_any(str(tmp_path / "gray.jpg"), "BGR")
    assert gray.shape == (20, 30, 3) and np.abs(gray.astype(int) - 100).max() <= 1
    assert (
        np.abs(read_image_any(str(tmp_path / "palette.png"), "RGB").astype(int) - color).max() < 8
    )
    assert np.abs(read_image_any(str(tmp_path / "cmyk.jpg"), "RGB").astype(int) - color).max() < 8
    assert read_image_any(str(tmp_path / "one_pixel.png")).shape == (1, 1, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_detectron2_applies_it(tmp_path, orientation):
    """Detectron2's `read_image` is the authority: the same pixels for each of the 8 EXIF
    orientations, and `check_image_file` compares the size after it."""
    from detectron2.data.detection_utils import read_image

    pixels = np.random.default_rng(orientation).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    for name in ("turned.jpg", "turned.png"):
        path = str(tmp_path / name)
        Image.fromarray(pixels).save(path, exif=exif)
        for format in ("RGB", "BGR"):
            expected = read_image(path, format=format)
            np.testing.assert_array_equal(read_image_any(path, format), expected)
        height, width = expected.shape[:2]
        assert (width, height) == ((24, 40) if orientation >= 5 else (40, 24))
        check_image_file(path, width, height)
        if width != height:
            with pytest.raises(BadImageError, match="after EXIF orientation"):
                check_image_file(path, height, width)


def test_read_image_any_bad_files_name_the_file(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    for name, says in [
        ("truncated.jpg", "truncated"),
        ("garbage.png", "cannot identify"),
        ("missing.jpg", "not found"),
    ]:
        with pytest.raises(BadImageError, match=says) as info:
            read_image_any(str(tmp_path / name))
        assert str(tmp_path / name) in str(info.value)


def test_as_uint8_image():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert (as_uint8_image(gray) == gray[:, :, None]).all() and as_uint8_image(gray).shape == (
        3,
        4,
        3,
    )
    assert as_uint8_image(gray[:, :, None]).shape == (3, 4, 3)
    rgba = np.dstack([np.full((3, 4), v, np.uint8) for v in (1, 2, 3, 4)])
    assert (as_uint8_image(rgba)[0, 0] == [1, 2, 3]).all()
    gray_alpha = np.dstack([gray, np.full((3, 4), 255, np.uint8)])
    assert (as_uint8_image(gray_alpha)[..., 2] == gray).all()
    assert as_uint8_image(np.full((2, 2), 65535, np.uint16)).max() == 255
    assert as_uint8_image(np.full((2, 2), 32896, np.uint16)).max() == 128
    assert as_uint8_image(np.full((2, 2), 200, np.uint16)).max() == 200  # 8-bit data in uint16
    assert as_uint8_image(np.full((2, 2, 3), 0.5, np.float32)).max() == 128
    assert as_uint8_image(np.full((2, 2, 3), 300.0)).max() == 255
    for bad in (np.zeros((2, 2, 5)), np.zeros((0, 4)), np.full((2, 2), np.nan)):
        with pytest.raises(ValueError):
            as_uint8_image(bad)


def test_check_image_file(broken_test_split):
    good = Path(broken_test_split.image_root) / broken_test_split.images[0]["file_name"]
    w, h = broken_test_split.images[0]["width"], broken_test_split.images[0]["height"]
    check_image_file(str(good), w, h)
    for path, message in zip(broken_test_split.bad, ["truncated", "not found"]):
        with pytest.raises(BadImageError, match=message) as info:
            check_image_file(path)
        assert path in str(info.value)
    with pytest.raises(BadImageError, match=f"is {w}x{h} .*says {w + 1}x{h}"):
        check_image_file(str(good), w + 1, h)
    # PIL's verify() passes the truncated JPEG (why the check decodes it).
    Image.open(broken_test_split.bad[0]).verify()
    # Bytes after the end-of-image marker decode: not a problem.
    padded = good.with_name("padded.jpg")
    padded.write_bytes(good.read_bytes() + b"\0" * 64)
    check_image_file(str(padded), w, h)
    # EXIF orientation 6 (90 degrees): Detectron2's read_image swaps the sides, so does the check.
    turned = good.with_name("turned.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(good).save(turned, exif=exif)
    check_image_file(str(turned), h, w)
    with pytest.raises(BadImageError, match="after EXIF orientation"):
        check_image_file(str(turned), w, h)
