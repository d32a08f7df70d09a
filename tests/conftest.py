"""Shared fixtures, helpers and markers of the test suite.

Markers (pyproject.toml): ``slow`` for end-to-end tests (train_net.py and the tools in
subprocesses, whole configs) and the few unit tests that take many seconds; ``pytest -m "not
slow"`` is the fast tier. ``cuda`` for tests that need a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import pickle
import shutil
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from hiera_det.checkpoint import (
    TRUST_ENV,
    UnsafeCheckpointError,
)

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_REASON = "compares with the official model: pip install hiera-transformer"


@pytest.fixture(scope="session")
def official_hiera() -> ModuleType:
    """The official `hiera-transformer` package (``hiera``), the numerical reference of the
    backbone and the MAE; the test is skipped where it is not installed (it is in the dev extra)."""
    return pytest.importorskip("hiera", reason=OFFICIAL_REASON)


@pytest.fixture(scope="session")
def official_mae() -> ModuleType:
    """The official MAE module (``hiera.hiera_mae``); see `official_hiera`."""
    return pytest.importorskip("hiera.hiera_mae", reason=OFFICIAL_REASON)


def load_script(relative_path: str, name: str) -> ModuleType:
    """Import a script of the repository that is not in a package (``train_net.py``, ``demo.py``,
    ``tools/benchmark.py``) as module `name`."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (tools/gpu_check.py) look their module up there
    spec.loader.exec_module(module)
    return module


def write_tiny_coco(root: Path, num_images: int = 4, seed: int = 0) -> SimpleNamespace:
    """Write a COCO-format instances dataset: `num_images` JPEGs (96-160 px, varied aspect ratios)
    with 1-3 filled rectangles or triangles each, polygon masks, two categories.

    Returns ``SimpleNamespace(json_file, image_root, num_images, num_classes)``.
    """
    rng = np.random.default_rng(seed)
    image_root = root / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    categories = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "triangle"}]
    images, annotations = [], []
    for i in range(num_images):
        h, w = (int(v) for v in rng.integers(96, 161, size=2))
        image = np.full((h, w, 3), rng.integers(0, 80), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            x1, y1 = int(rng.integers(x0 + 16, w)), int(rng.integers(y0 + 16, h))
            category = int(rng.integers(1, 3))
            if category == 1:
                poly = [x0, y0, x1, y0, x1, y1, x0, y1]
            else:
                poly = [x0, y1, (x0 + x1) // 2, y0, x1, y1]
            points = np.array(poly, np.int32).reshape(-1, 2)
            cv2.fillPoly(image, [points], [int(c) for c in rng.integers(120, 256, size=3)])
            xs, ys = points[:, 0], points[:, 1]
            box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": category,
                    "bbox": box,
                    "area": float(cv2.contourArea(points)),
                    "segmentation": [[float(v) for v in poly]],
                    "iscrowd": 0,
                }
            )
        name = f"{i:06d}.jpg"
        cv2.imwrite(str(image_root / name), image)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    json_file = root / "instances.json"
    content = {"images": images, "annotations": annotations, "categories": categories}
    json_file.write_text(json.dumps(content))
    return SimpleNamespace(
        json_file=str(json_file),
        image_root=str(image_root),
        num_images=num_images,
        num_classes=len(categories),
    )


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> SimpleNamespace:
    """A 4-image COCO-format dataset (see `write_tiny_coco`), written once per session."""
    return write_tiny_coco(tmp_path_factory.mktemp("tiny_coco"))


def assert_stages_match(ours, ref, x, atol: float = 1e-4) -> None:
    """Our Hiera's four stage outputs (``res2``..``res5``) on `x` equal those of timm's `ref`
    (`forward_intermediates`) within `atol`."""
    with torch.no_grad():
        expected = ref.forward_intermediates(x, intermediates_only=True)
        got = ours(x)
    assert list(got) == ["res2", "res3", "res4", "res5"]
    for (name, y), y_ref in zip(got.items(), expected):
        assert y.shape == y_ref.shape, name
        err = (y - y_ref).abs().max().item()
        assert err <= atol, f"{name}: max |ours - timm| = {err:.2e} > {atol:.0e}"


def is_ln(norm) -> bool:
    """A config's `norm` / `conv_norm` is the paper's channels-first LayerNorm as the configs build
    it: ``L(channel_layer_norm)()`` (Detectron2's "LN", fused)."""
    from hiera_det.modeling import channel_layer_norm

    return getattr(norm, "_target_", None) is channel_layer_norm


def shrink_overrides(image_size: int = 128) -> list[str]:
    """``key=value`` overrides (for `LazyConfig.apply_overrides` or train_net.py) that shrink a
    Mask R-CNN Hiera config to a tiny model on small images, keeping every kind of part: mask unit,
    windowed (stage 3, 7x7 units, padded) and global (block 4, stage 4) attention."""
    s = image_size
    return [
        "model.backbone.bottom_up.embed_dim=16",
        "model.backbone.bottom_up.num_heads=1",
        "model.backbone.bottom_up.stages=[1,1,3,1]",
        "model.backbone.bottom_up.global_blocks=[4]",
        f"model.backbone.square_pad={s}",
        "model.backbone.out_channels=32",
        "model.proposal_generator.head.in_channels=32",
        "model.roi_heads.box_head.input_shape.channels=32",
        "model.roi_heads.box_head.conv_dims=[32,32,32,32]",
        "model.roi_heads.box_head.fc_dims=[64]",
        "model.roi_heads.box_predictor.input_shape.channels=64",
        "model.roi_heads.mask_head.input_shape.channels=32",
        "model.roi_heads.mask_head.conv_dims=[32,32,32,32,32]",
        "model.proposal_generator.pre_nms_topk=[200,100]",
        "model.proposal_generator.post_nms_topk=[100,50]",
        "model.roi_heads.batch_size_per_image=32",
        f"dataloader.train.mapper.augmentations.1.target_height={s}",
        f"dataloader.train.mapper.augmentations.1.target_width={s}",
        f"dataloader.train.mapper.augmentations.2.crop_size=[{s},{s}]",
        f"dataloader.test.mapper.augmentations.0.short_edge_length={s}",
        f"dataloader.test.mapper.augmentations.0.max_size={s}",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "train.init_checkpoint=''",
        "train.device=cpu",
    ]


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread: tiny models gain nothing from more, and on a busy
    machine OpenMP threads that wait for each other make small ops many times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def mae_shrink_overrides() -> list[str]:
    """Overrides that shrink an MAE config (configs/mae/) to a model a CPU trains in a second, on
    64 px crops (the encoder keeps its size's depth: add ``model.encoder.stages=[1,1,2,1]``)."""
    return [
        "model.encoder.embed_dim=16",
        "model.encoder.num_heads=1",
        "model.encoder.pretrain_img_size=64",
        "model.decoder_embed_dim=32",
        "model.decoder_depth=2",
        "model.decoder_num_heads=4",
        "dataloader.train.img_size=64",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
    ]


@pytest.fixture(scope="session")
def mae_images(tmp_path_factory) -> Path:
    """A folder of 7 generated images in two sub-folders, plus one corrupt file (8 files)."""

    root = tmp_path_factory.mktemp("mae_images")
    rng = np.random.default_rng(0)
    for i in range(7):
        folder = root / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        # Smooth random images (upsampled noise), so there is something to reconstruct.
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((96, 72), Image.BICUBIC).save(folder / f"{i}.png")
    (root / "class1" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


class Touch:
    """Unpickling this calls ``pathlib.Path(path).touch()``: code run by loading a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.fixture
def evil(tmp_path):
    """(a torch checkpoint, a model-zoo .pkl, the file either creates when unpickled)."""
    flag = tmp_path / "code_ran"
    from hiera_det.modeling import Hiera

    weights = dict(Hiera(embed_dim=16, stages=(1, 1, 2, 1)).state_dict())
    pth = tmp_path / "evil.pth"
    torch.save({"model": weights, "iteration": 3, "payload": Touch(flag)}, pth)
    pkl = tmp_path / "evil.pkl"
    numpy_weights = {k: v.numpy() for k, v in weights.items()}
    with open(pkl, "wb") as f:
        pickle.dump({"model": numpy_weights, "__author__": "x", "payload": Touch(flag)}, f, 2)
    return pth, pkl, flag


def assert_refused(run, path: Path, flag: Path) -> None:
    with pytest.raises(UnsafeCheckpointError) as err:
        run()
    message = str(err.value)
    assert str(path) in message and "getattr" in message, message  # the file and what it needed
    assert TRUST_ENV in str(err.value)
    assert not flag.exists(), "loading the checkpoint ran its code"


@pytest.fixture
def coco(tiny_coco, tmp_path) -> tuple[Path, Path, dict]:
    """A private copy of the tiny COCO dataset: (json_file, image_root, content)."""
    root = tmp_path / "images"
    shutil.copytree(tiny_coco.image_root, root)
    json_file = tmp_path / "instances.json"
    content = json.loads(Path(tiny_coco.json_file).read_text())
    json_file.write_text(json.dumps(content))
    return json_file, root, content


def write_json(json_file: Path, content: dict) -> None:
    json_file.write_text(json.dumps(content))


def copy_tiny_coco(tiny_coco, folder: Path) -> SimpleNamespace:
    """A private copy of the tiny COCO dataset (4 images)."""
    root = folder / "images"
    shutil.copytree(tiny_coco.image_root, root)
    json_file = folder / "instances.json"
    shutil.copy(tiny_coco.json_file, json_file)
    images = json.loads(json_file.read_text())["images"]
    return SimpleNamespace(json_file=str(json_file), image_root=str(root), images=images)


@pytest.fixture
def broken_test_split(tiny_coco, tmp_path) -> SimpleNamespace:
    """The tiny dataset with image 1 truncated and image 2 missing; `.bad` are their paths."""
    data = copy_tiny_coco(tiny_coco, tmp_path / "test")
    truncated, missing = (Path(data.image_root) / data.images[i]["file_name"] for i in (1, 2))
    truncated.write_bytes(truncated.read_bytes()[:-200])
    missing.unlink()
    data.bad = [str(truncated), str(missing)]
    data.bad_ids = [data.images[1]["id"], data.images[2]["id"]]
    return data
