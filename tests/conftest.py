"""Shared fixtures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


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
