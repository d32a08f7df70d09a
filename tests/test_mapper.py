"""The training-time mapper (hiera_det.data.mapper): Detectron2's `DatasetMapper` that skips bad
images with a count, reads every image mode, and otherwise maps as Detectron2 does."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import write_json
from detectron2.data import build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.data.datasets import load_coco_json
from PIL import Image

from hiera_det.data.mapper import RobustDatasetMapper


def _mapper(**kwargs) -> RobustDatasetMapper:
    return RobustDatasetMapper(
        is_train=True,
        augmentations=[T.ResizeShortestEdge(64, 64)],
        image_format="RGB",
        use_instance_mask=True,
        **kwargs,
    )


def test_mapper_skips_bad_images_and_counts(coco, caplog):
    json_file, root, content = coco
    images = content["images"]
    data = (root / images[0]["file_name"]).read_bytes()
    (root / images[0]["file_name"]).write_bytes(data[: len(data) // 3])  # truncated
    (root / images[1]["file_name"]).unlink()  # missing
    images[2]["width"] += 7  # the annotation's size disagrees with the file
    write_json(json_file, content)
    dicts = load_coco_json(str(json_file), str(root))
    dicts[3]["annotations"].append(
        {
            "bbox": [0, 0, 0, 0],
            "bbox_mode": dicts[3]["annotations"][0]["bbox_mode"],
            "category_id": 0,
            "iscrowd": 0,
        }  # fmt: skip
    )
    mapper = _mapper()
    with caplog.at_level(logging.WARNING, logger="hiera_det.data.mapper"):
        outputs = [mapper(d) for d in dicts]
    assert [o is None for o in outputs] == [True, True, True, False]
    assert mapper.num_skipped_images == 3 and mapper.num_skipped_annotations == 1
    assert len(outputs[3]["instances"]) == len(dicts[3]["annotations"]) - 1
    messages = [r.getMessage() for r in caplog.records]
    for i, what in [(0, "Truncated"), (1, "not found"), (2, "Mismatched image shape")]:
        assert any(dicts[i]["file_name"] in m and what in m for m in messages), (what, messages)
    assert "3 images skipped so far" in messages[-1]

    # Through Detectron2's loader the skipped images are replaced: every batch is full.
    loader = build_detection_train_loader(dicts, mapper=_mapper(), total_batch_size=2)
    for _, batch in zip(range(3), loader):
        assert len(batch) == 2 and all(d["file_name"] == dicts[3]["file_name"] for d in batch)


def test_mapper_stops_when_nothing_is_readable(coco):
    json_file, root, _ = coco
    dicts = load_coco_json(str(json_file), str(root))
    for d in dicts:
        Path(d["file_name"]).unlink()
    mapper = _mapper(max_consecutive_failures=3)
    with pytest.raises(RuntimeError, match="3 images in a row could not be read"):
        for d in dicts:
            mapper(d)


def test_mapper_reads_16bit_and_gray_images(coco):
    json_file, root, content = coco
    dicts = load_coco_json(str(json_file), str(root))
    path = Path(dicts[0]["file_name"])
    rgb = np.asarray(Image.open(path).convert("RGB"))
    gray16 = (rgb[..., 1].astype(np.uint16) * 257).astype(np.uint16)
    cv2.imwrite(str(path.with_suffix(".png")), gray16)
    dicts[0]["file_name"] = str(path.with_suffix(".png"))
    mapper = RobustDatasetMapper(is_train=False, augmentations=[], image_format="RGB")
    image = mapper(dicts[0])["image"]
    assert image.shape == (3, *rgb.shape[:2])
    assert (image[0] == image[2]).all() and (image[1].numpy() == rgb[..., 1]).all()


@pytest.mark.parametrize("is_train", [True, False])
def test_mapper_maps_an_ordinary_image_as_detectron2_does(coco, is_train):
    """For an 8-bit image with good annotations the robust mapper is Detectron2's `DatasetMapper`
    (its read, then the same augmentation, tensors and instances)."""
    from detectron2.data.dataset_mapper import DatasetMapper

    json_file, root, _ = coco
    dicts = load_coco_json(str(json_file), str(root))
    kwargs = dict(
        is_train=is_train,
        augmentations=[T.RandomFlip(0.5), T.ResizeShortestEdge((48, 64, 80), 96, "choice")],
        image_format="RGB",
        use_instance_mask=True,
        recompute_boxes=True,
    )
    for index, d in enumerate(dicts):
        torch.manual_seed(index), np.random.seed(index)
        ours = RobustDatasetMapper(**kwargs)(d)
        torch.manual_seed(index), np.random.seed(index)
        theirs = DatasetMapper(**kwargs)(d)
        assert ours.keys() == theirs.keys()
        assert torch.equal(ours["image"], theirs["image"])
        assert ("instances" in ours) == is_train
        if is_train:
            a, b = ours["instances"], theirs["instances"]
            assert len(a) == len(b) > 0
            assert torch.equal(a.gt_boxes.tensor, b.gt_boxes.tensor)
            assert torch.equal(a.gt_classes, b.gt_classes)
            assert [p.tolist() for p in a.gt_masks.polygons[0]] == [
                p.tolist() for p in b.gt_masks.polygons[0]
            ]
