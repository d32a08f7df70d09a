"""Bad data: image modes, unreadable files, faulty annotations (hiera_det.data.images,
hiera_det.data.validation, hiera_det.data.mapper, hiera_det.predictor.RobustPredictor)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.data.datasets import load_coco_json
from PIL import Image

from hiera_det.data.images import BadImageError, as_uint8_image, read_image_any
from hiera_det.data.mapper import RobustDatasetMapper
from hiera_det.data.validation import DatasetError, find_annotation_problem, validate_coco_json


@pytest.fixture
def coco(tiny_coco, tmp_path) -> tuple[Path, Path, dict]:
    """A private copy of the tiny COCO dataset: (json_file, image_root, content)."""
    root = tmp_path / "images"
    shutil.copytree(tiny_coco.image_root, root)
    json_file = tmp_path / "instances.json"
    content = json.loads(Path(tiny_coco.json_file).read_text())
    json_file.write_text(json.dumps(content))
    return json_file, root, content


def _write(json_file: Path, content: dict) -> None:
    json_file.write_text(json.dumps(content))


# --- images -------------------------------------------------------------------------------------


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


# --- annotations --------------------------------------------------------------------------------


def test_find_annotation_problem():
    ok = {"bbox": [10, 10, 20, 20], "segmentation": [[10, 10, 30, 10, 30, 30]]}
    assert find_annotation_problem(ok, 64, 64) is None
    assert find_annotation_problem({"bbox": [-5, -5, 20, 20]}, 64, 64) is None  # partly outside
    cases = {
        "empty box": {"bbox": [10, 10, 0, 5]},
        "box outside the image": {"bbox": [70, 10, 5, 5]},
        "bad bbox": {"bbox": [1, 2, 3]},
        "empty segmentation": dict(ok, segmentation=[]),
        "bad polygon": dict(ok, segmentation=[[1, 2, 3, 4]]),
        "degenerate polygon": dict(ok, segmentation=[[0, 0, 10, 10, 20, 20]]),
        "bad RLE": dict(ok, segmentation={"counts": "abc", "size": [32, 32]}),
    }
    for kind, ann in cases.items():
        assert find_annotation_problem(ann, 64, 64).startswith(kind), kind


def test_validate_reports_what_training_skips(coco):
    json_file, root, content = coco
    anns = content["annotations"]
    anns[0]["segmentation"] = []
    anns[1]["segmentation"] = [[0, 0, 5, 5, 10, 10]]  # collinear
    anns[2]["bbox"] = [5000, 5000, 10, 10]
    (root / content["images"][-1]["file_name"]).unlink()
    _write(json_file, content)
    report = validate_coco_json(str(json_file), str(root))
    assert report.skipped_annotations == {
        "empty segmentation": [anns[0]["id"]],
        "degenerate polygon": [anns[1]["id"]],
        "box outside the image": [anns[2]["id"]],
    }
    assert report.missing_images == [content["images"][-1]["file_name"]]
    text = str(report)
    assert "3 annotations" in text and "1 missing images" in text
    assert f"annotation id {anns[2]['id']}" in text


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda c: c["annotations"][1].update(category_id=99), "annotation id 2 .* category_id 99"),
        (lambda c: c["annotations"][0].update(image_id=1234), "unknown image id 1234"),
        (lambda c: c["annotations"][0].update(bbox=[]), "annotation id 1: bbox"),
        (lambda c: c["annotations"][1].update(id=1), "duplicate annotation id 1"),
        (lambda c: c["images"][0].update(width=0), "image id 1 .* width=0"),
        (lambda c: c.pop("categories"), "no 'categories' list"),
    ],
)
def test_validate_stops_on_inconsistent_json(coco, corrupt, message):
    json_file, root, content = coco
    corrupt(content)
    _write(json_file, content)
    with pytest.raises(DatasetError, match=message) as info:
        validate_coco_json(str(json_file), str(root))
    assert str(json_file) in str(info.value)


def test_validate_stops_on_bad_files(coco, tmp_path):
    json_file, root, content = coco
    json_file.write_text(json.dumps(content)[:-10])
    with pytest.raises(DatasetError, match="not valid JSON"):
        validate_coco_json(str(json_file), str(root))
    _write(json_file, content)
    with pytest.raises(DatasetError, match="none of its 4 image files"):
        validate_coco_json(str(json_file), str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetError, match="annotation file not found"):
        validate_coco_json(str(tmp_path / "nope.json"))


def test_validate_reads_a_rewritten_file_again(coco):
    """A file validated once and rewritten with other content of the same size (in the same
    modification-time tick) is checked anew, not answered from what the first check learnt."""
    json_file, root, content = coco
    assert validate_coco_json(str(json_file), str(root)).skipped_annotations == {}
    size = json_file.stat().st_size
    content["annotations"][1]["id"] = 1  # was 2: same length, now a duplicate id
    _write(json_file, content)
    assert json_file.stat().st_size == size
    with pytest.raises(DatasetError, match="duplicate annotation id 1"):
        validate_coco_json(str(json_file), str(root))


def test_detectron2_unknown_category_error_does_not_name_the_file(coco):
    """Why the validator exists: Detectron2's own loader fails without naming the file."""
    json_file, root, content = coco
    content["annotations"][0]["category_id"] = 99
    _write(json_file, content)
    with pytest.raises(KeyError) as info:
        load_coco_json(str(json_file), str(root), "reliability_unknown_category")
    assert str(json_file) not in str(info.value)
    DatasetCatalog.remove("reliability_unknown_category") if "reliability_unknown_category" in (
        DatasetCatalog.list()
    ) else None


# --- training-time mapper -----------------------------------------------------------------------


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
    _write(json_file, content)
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


# --- prediction ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor():
    """A small Detectron2 Mask R-CNN (R18-FPN, random weights) behind `RobustPredictor`."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    from hiera_det.predictor import RobustPredictor

    cfg = get_cfg()
    cfg.merge_from_file(
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    )
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    cfg.INPUT.FORMAT = "RGB"
    return RobustPredictor(cfg)


def test_predictor_takes_every_image_mode_and_size(predictor, tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "gray16.png"), rng.integers(0, 65536, (50, 40), dtype=np.uint16))
    Image.fromarray(np.dstack([rgb, rgb[..., 0]])).save(tmp_path / "rgba.png")
    inputs = {
        "rgb": rgb,
        "gray": rgb[..., 0],
        "gray [H,W,1]": rgb[..., :1],
        "rgba": np.dstack([rgb, rgb[..., 0]]),
        "16-bit": rgb.astype(np.uint16) * 257,
        "float": rgb / 255.0,
        "tiny 8x8": rgb[:8, :8],
        "1x1": rgb[:1, :1],
        "very large 3000x4000": np.zeros((3000, 4000), np.uint8),
        "file 16-bit gray": str(tmp_path / "gray16.png"),
        "file rgba": str(tmp_path / "rgba.png"),
    }
    for what, image in inputs.items():
        instances = predictor(image)["instances"]
        shape = (
            cv2.imread(image, cv2.IMREAD_UNCHANGED).shape if isinstance(image, str) else image.shape
        )
        assert instances.image_size == shape[:2], what
    # The same picture as gray uint8, gray uint16 and gray float gives the same input.
    gray = rgb[..., 1]
    a = predictor(gray)["instances"].scores
    for same in (gray.astype(np.uint16) * 257, gray / 255.0, np.repeat(gray[..., None], 3, 2)):
        assert torch.equal(predictor(same)["instances"].scores, a)


def test_predictor_reads_a_file_as_default_predictor_reads_its_bgr_array(
    predictor, tmp_path, monkeypatch
):
    """A file goes to the model as `DefaultPredictor` sends the BGR array OpenCV reads from it
    (the predictor's model takes RGB: `DefaultPredictor` flips BGR itself)."""
    from detectron2.engine import DefaultPredictor

    rng = np.random.default_rng(1)
    cv2.imwrite(str(tmp_path / "colour.png"), rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    seen = []
    monkeypatch.setattr(predictor, "model", lambda inputs: seen.append(inputs[0]) or [{}])
    predictor(str(tmp_path / "colour.png"))
    DefaultPredictor.__call__(predictor, cv2.imread(str(tmp_path / "colour.png")))
    assert predictor.input_format == "RGB"
    assert torch.equal(seen[0]["image"], seen[1]["image"])
