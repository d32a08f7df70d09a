"""Image folders: the listing (hiera_det.data.images) and MAE's image-folder loader
(hiera_det.mae.data)."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hiera_det.data.images import IMAGE_EXTENSIONS, list_images
from hiera_det.data.sampling import SeededMapDataset
from hiera_det.mae.data import (
    IMAGENET_MEAN,
    ImageFolder,
    build_mae_train_loader,
    build_mae_transform,
)

SKIP_LOGGER = "hiera_det.data.images"  # BadImageSkipper's warnings


def write_image(path, size=(40, 30), color=None, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(abs(hash(path)) % 2**32)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    if color is not None:
        pixels[:] = color
    Image.fromarray(pixels).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    write_image(str(root / "n01" / "a.JPEG"), fmt="JPEG")
    write_image(str(root / "n01" / "b.png"))
    write_image(str(root / "n02" / "deeper" / "c.webp"), fmt="WEBP")
    write_image(str(root / "d.jpg"), fmt="JPEG")
    write_image(str(root / "n02" / "e.TIF"), fmt="TIFF")
    (root / "notes.txt").write_text("not an image")
    write_image(str(root / ".hidden.jpg"), fmt="JPEG")
    return root


def test_lists_images_recursively_in_sorted_order_by_extension(folder):
    paths = list_images(str(folder))
    rel = [os.path.relpath(p, folder) for p in paths]
    assert rel == ["d.jpg", "n01/a.JPEG", "n01/b.png", "n02/deeper/c.webp", "n02/e.TIF"]
    assert list_images(str(folder)) == paths
    # Every format PIL reads that demo.py and MAE take.
    assert IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def test_missing_or_empty_folders_are_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="'.*nowhere' does not exist"):
        list_images(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "x.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images .* in folder '.*empty'"):
        list_images(str(tmp_path / "empty"))


def test_corrupt_images_are_reported_by_path_and_replaced(folder, caplog):
    bad = folder / "n01" / "a.JPEG"
    bad.write_bytes(b"definitely not a jpeg")
    truncated = folder / "n01" / "b.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    dataset = ImageFolder(str(folder), transform=None)
    image = dataset[0]  # d.jpg is fine
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    with caplog.at_level(logging.WARNING, logger=SKIP_LOGGER):
        assert dataset[dataset.paths.index(str(bad))] is None
        assert dataset[dataset.paths.index(str(truncated))] is None
    messages = [r.getMessage() for r in caplog.records if "Skipped image" in r.getMessage()]
    assert len(messages) == 2 and str(bad) in messages[0] and str(truncated) in messages[1]
    assert "(2 images skipped so far" in messages[1]
    # Through the loader's dataset another image, drawn from the sample's seed, replaces it.
    for seed in range(5):
        replaced = SeededMapDataset(dataset)[(dataset.paths.index(str(bad)), seed)]
        assert isinstance(replaced, Image.Image) and replaced.mode == "RGB"


def test_images_are_read_as_detection_reads_them(tmp_path):
    """16-bit images scaled (not clipped at 255), EXIF orientation applied: `read_image_any`."""
    ramp = np.linspace(0, 65535, 30 * 40).reshape(30, 40).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated by 90 degrees
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "turned.jpg", exif=exif)
    dataset = ImageFolder(str(tmp_path), transform=None)
    gray = np.asarray(dataset[dataset.paths.index(str(tmp_path / "gray16.png"))])
    np.testing.assert_allclose(gray[:, :, 0], ramp / 257.0, atol=0.51)
    assert dataset[dataset.paths.index(str(tmp_path / "turned.jpg"))].size == (30, 40)


def test_a_folder_of_unreadable_files_raises_instead_of_looping(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"garbage")
    dataset = SeededMapDataset(ImageFolder(str(tmp_path), max_consecutive_failures=3))
    with pytest.raises(RuntimeError, match="3 images in a row could not be read"):
        dataset[(0, 0)]


def _skip_messages(records):
    return [r.getMessage() for r in records if "Skipped image" in r.getMessage()]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_yields_batches_and_logs_each_skipped_file(folder, caplog, tmp_path, num_workers):
    """The reading process logs each skip with the file and its count (in a loader worker too:
    its log reaches the handlers it inherited, here a file)."""
    bad = str(folder / "n01" / "a.JPEG")
    (folder / "n01" / "a.JPEG").write_bytes(b"broken")
    loader = build_mae_train_loader(
        str(folder), total_batch_size=4, img_size=32, num_workers=num_workers, seed=0
    )
    assert loader.sampler.size == 5  # the listed images
    log_file = tmp_path / "log.txt"
    handler = logging.FileHandler(log_file)
    logging.getLogger(SKIP_LOGGER).addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING, logger=SKIP_LOGGER):
            batches = [b for _, b in zip(range(5), loader)]  # 4 epochs of 5 images
    finally:
        logging.getLogger(SKIP_LOGGER).removeHandler(handler)
        handler.close()
    for batch in batches:
        assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.float32
    messages = [line for line in log_file.read_text().splitlines() if "Skipped image" in line]
    if num_workers == 0:
        assert messages == _skip_messages(caplog.records)
    assert len(messages) >= 4  # the file comes up once per epoch, and maybe as a replacement
    assert all(bad in m for m in messages)
    assert f"({len(messages)} images skipped so far" in messages[-1]


def test_loader_batches_are_normalised_with_the_imagenet_mean_and_std(tmp_path):
    """Solid-colour images stay solid through any crop, resize and flip, so every sample of a
    batch must be exactly (colour / 255 - mean) / std per channel, with MAE's ImageNet statistics
    (official hiera_mae / torchvision: mean 0.485 0.456 0.406, std 0.229 0.224 0.225)."""
    colours = [(0, 0, 0), (255, 255, 255), (200, 30, 90), (12, 180, 250)]
    for i, colour in enumerate(colours):
        write_image(str(tmp_path / f"{i}.png"), size=(48, 36), color=colour)
    loader = build_mae_train_loader(
        str(tmp_path), total_batch_size=4, img_size=32, num_workers=0, seed=0
    )
    batch = next(iter(loader))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (torch.tensor(colours, dtype=torch.float32) / 255 - mean) / std  # [4, 3]
    assert batch.shape == (4, 3, 32, 32)
    per_sample = batch.mean(dim=(2, 3))  # [4, 3]
    torch.testing.assert_close(
        batch, per_sample[:, :, None, None].expand_as(batch), atol=1e-5, rtol=0
    )
    # Each image once per epoch, in some order.
    order = [int((expected - s).abs().sum(1).argmin()) for s in per_sample]
    assert sorted(order) == [0, 1, 2, 3]
    torch.testing.assert_close(per_sample, expected[order], atol=1e-5, rtol=0)


def test_batch_size_must_split_over_processes(folder):
    with pytest.raises(ValueError, match="total_batch_size=0"):
        build_mae_train_loader(str(folder), total_batch_size=0)


def test_mae_transform_crops_flips_and_normalises():
    torch.manual_seed(0)
    image = Image.new("RGB", (300, 200), color=(124, 116, 104))  # ~ the ImageNet mean
    out = build_mae_transform(64)(image)
    assert out.shape == (3, 64, 64)
    assert out.abs().max() < 0.05  # mean colour maps to ~0 after normalisation
    gradient = Image.fromarray(
        np.tile(np.arange(256, dtype=np.uint8), (256, 1))[..., None].repeat(3, 2)
    )
    flips = {
        bool(build_mae_transform(32, scale=(1.0, 1.0))(gradient)[0, 0, 0] > 0) for _ in range(20)
    }
    assert flips == {True, False}  # left edge dark or bright: flipped about half the time
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
