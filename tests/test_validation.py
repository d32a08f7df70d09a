"""COCO instances files checked before training (hiera_det.data.validation): what stops the run
(naming the file and the ids), what training skips (counted and reported), and the check of every
test image before evaluation."""

from __future__ import annotations

import hashlib
import json
import logging
import random

import pytest
import simdjson
from conftest import write_json
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from hiera_det.data import validation
from hiera_det.data.datasets import register_coco_format, register_readable_subset
from hiera_det.data.validation import (
    DatasetError,
    check_test_images,
    find_annotation_problem,
    find_unreadable_images,
    validate_coco_json,
)


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
    write_json(json_file, content)
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
    write_json(json_file, content)
    with pytest.raises(DatasetError, match=message) as info:
        validate_coco_json(str(json_file), str(root))
    assert str(json_file) in str(info.value)


def test_validate_stops_on_bad_files(coco, tmp_path):
    json_file, root, content = coco
    json_file.write_text(json.dumps(content)[:-10])
    with pytest.raises(DatasetError, match="not valid JSON"):
        validate_coco_json(str(json_file), str(root))
    write_json(json_file, content)
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
    write_json(json_file, content)
    assert json_file.stat().st_size == size
    with pytest.raises(DatasetError, match="duplicate annotation id 1"):
        validate_coco_json(str(json_file), str(root))


ODD_TYPES = {
    "none": [],
    "bools, strings, lists": [
        lambda: [[True, 0, 10, 0, 10, 10]],
        lambda: [["1", 0, 10, 0, 10, 10]],
        lambda: [[[1, 2], 3, 4, 5, 6, 7]],
    ],
    "NaN": [lambda: [[float("nan"), 0, 10, 0, 10, 10], [10, 10, 30, 10, 30, 30]]],
}


def _varied_annotations(rng: random.Random, sizes: list, odd_types: list) -> list[dict]:
    """Annotations of the kinds the checks tell apart: good ones, near-degenerate polygons,
    boxes at and beyond the edges, RLEs, and segmentations made by `odd_types`."""
    segmentations = [
        lambda: [[10, 10, 30, 10, 30, 30]],
        lambda: [[0, 0, 5, 5, 10, 10]],  # collinear
        lambda: [[0, 0, 1e-9, 0, 0, 1e-9]],  # an area within rounding of zero
        lambda: [[0, 0, 1e-3, 0, 0, 1e-3], [1, 2, 3, 4]],
        lambda: [[1, 2, 3, 4, 5]],
        lambda: [],
        lambda: {"counts": "abc", "size": [32, 32]},
        lambda: "not a segmentation",
        lambda: None,
    ] + odd_types
    boxes = [[10, 10, 20, 20], [-5, -5, 20, 20], [0, 0, 0, 5], [63.5, 10, 5, 5], [-30, 0, 30, 9]]
    annotations = []
    for i in range(400):
        image_id = rng.randrange(len(sizes)) + 1
        ann = {"id": i + 1, "image_id": image_id, "category_id": 1}
        ann["bbox"] = list(rng.choice(boxes))
        segm = rng.choice(segmentations)()
        if isinstance(segm, dict) and rng.random() < 0.5:
            segm["size"] = [sizes[image_id - 1][1], sizes[image_id - 1][0]]
        if segm is not None:
            ann["segmentation"] = segm
        annotations.append(ann)
    return annotations


@pytest.mark.parametrize("odd_types", ODD_TYPES)
def test_screened_report_is_the_one_of_checking_each_annotation(coco, odd_types):
    """Thousands of annotations are screened at once; the report must be the one
    `find_annotation_problem` gives annotation by annotation. (simdjson refuses NaN: that file
    is read by json and each annotation checked in Python.)"""
    json_file, root, content = coco
    sizes = [(img["width"], img["height"]) for img in content["images"]]
    content["annotations"] = _varied_annotations(random.Random(0), sizes, ODD_TYPES[odd_types])
    write_json(json_file, content)
    if odd_types != "NaN":  # the screen, not the one-by-one check, clears the plain good ones
        anns = content["annotations"]
        lazy = list(simdjson.Parser().parse(json_file.read_bytes())["annotations"])
        suspects = validation._screen_annotations(lazy, dict(enumerate(sizes, 1)), {1, 2})
        plain = [
            i for i, a in enumerate(anns) if a.get("segmentation") == [[10, 10, 30, 10, 30, 30]]
        ]
        good = [
            i
            for i in plain
            if find_annotation_problem(anns[i], *sizes[anns[i]["image_id"] - 1]) is None
        ]
        assert good and suspects is not None and not set(good) & set(suspects)
    expected: dict[str, list] = {}
    for ann in json.loads(json_file.read_text())["annotations"]:
        problem = find_annotation_problem(ann, *sizes[ann["image_id"] - 1])
        if problem is not None:
            expected.setdefault(problem.split(":")[0], []).append(ann["id"])
    assert len(expected) >= 6  # the file has problems of many kinds
    assert validate_coco_json(str(json_file), str(root)).skipped_annotations == expected


def test_not_finite_bbox_is_named_whichever_parser_reads_the_file(coco):
    """simdjson (installed by the set-up) refuses NaN, which Python's json and Detectron2 read:
    the file is then read with json and the annotation named as before."""
    json_file, root, content = coco
    assert validation.simdjson is not None
    content["annotations"][2]["bbox"] = [1, 2, float("nan"), 4]
    write_json(json_file, content)
    with pytest.raises(DatasetError, match="annotation id 3: bbox .* not 4 finite numbers"):
        validate_coco_json(str(json_file), str(root))


def _forget_checked_files() -> None:
    """What a new process knows of checked files: nothing (the in-process cache emptied)."""
    validation._checked.clear()


def test_verdict_kept_on_disk_is_used_by_a_later_run(coco, tmp_path, caplog):
    json_file, root, content = coco
    content["annotations"][0]["segmentation"] = []
    write_json(json_file, content)
    cache = tmp_path / "dataset_checks"
    first = validate_coco_json(str(json_file), str(root), cache_dir=str(cache))
    digest = hashlib.sha256(json_file.read_bytes()).hexdigest()
    assert [p.name for p in cache.iterdir()] == [f"{digest}-v{validation.CHECK_VERSION}.json"]
    _forget_checked_files()
    (root / content["images"][-1]["file_name"]).unlink()  # files are looked up every time
    caplog.clear()  # only what the second check logs
    with caplog.at_level(logging.INFO, logger="hiera_det.data.validation"):
        again = validate_coco_json(str(json_file), str(root), cache_dir=str(cache))
    assert "verdict kept in" in caplog.text and "parsed" not in caplog.text
    assert again.skipped_annotations == first.skipped_annotations == {"empty segmentation": [1]}
    assert again.missing_images == [content["images"][-1]["file_name"]] != first.missing_images
    assert (again.num_images, again.num_annotations) == (first.num_images, first.num_annotations)


def test_kept_verdict_of_a_broken_file_stops_the_same_way(coco, tmp_path, caplog):
    json_file, root, content = coco
    content["annotations"][1]["id"] = 1
    write_json(json_file, content)
    cache = str(tmp_path / "dataset_checks")
    with pytest.raises(DatasetError) as first:
        validate_coco_json(str(json_file), str(root), cache_dir=cache)
    _forget_checked_files()
    moved = tmp_path / "moved.json"
    json_file.rename(moved)  # the message names the file as it is now
    caplog.clear()  # only what the second check logs
    with caplog.at_level(logging.INFO, logger="hiera_det.data.validation"):
        with pytest.raises(DatasetError) as again:
            validate_coco_json(str(moved), str(root), cache_dir=cache)
    assert "verdict kept in" in caplog.text
    assert str(again.value) == str(first.value).replace(str(json_file), str(moved))
    assert "duplicate annotation id 1" in str(again.value)


def test_verdict_checked_in_this_process_is_kept_in_each_folder_asked(coco, tmp_path):
    """A second run in the same process (another output folder) keeps the verdict there too."""
    json_file, root, _ = coco
    first, second = tmp_path / "run1" / "dataset_checks", tmp_path / "run2" / "dataset_checks"
    validate_coco_json(str(json_file), str(root), cache_dir=str(first))
    validate_coco_json(str(json_file), str(root), cache_dir=str(second))
    assert [p.name for p in first.iterdir()] == [p.name for p in second.iterdir()]
    assert len(list(second.iterdir())) == 1


def test_unreadable_or_changed_kept_verdict_means_checking_again(coco, tmp_path, caplog):
    json_file, root, content = coco
    cache = tmp_path / "dataset_checks"
    validate_coco_json(str(json_file), str(root), cache_dir=str(cache))
    (kept,) = cache.iterdir()
    kept.write_text('{"num_images": ')  # cut short
    _forget_checked_files()
    caplog.clear()  # only what the second check logs
    with caplog.at_level(logging.INFO, logger="hiera_det.data.validation"):
        validate_coco_json(str(json_file), str(root), cache_dir=str(cache))
    assert "parsed" in caplog.text
    assert json.loads(kept.read_text())["num_images"] == len(content["images"])
    content["annotations"][1]["category_id"] = 99  # another digest: another verdict
    write_json(json_file, content)
    with pytest.raises(DatasetError, match="category_id 99"):
        validate_coco_json(str(json_file), str(root), cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 2


def test_detectron2_unknown_category_error_does_not_name_the_file(coco):
    """Why the validator exists: Detectron2's own loader fails without naming the file."""
    json_file, root, content = coco
    content["annotations"][0]["category_id"] = 99
    write_json(json_file, content)
    with pytest.raises(KeyError) as info:
        load_coco_json(str(json_file), str(root), "reliability_unknown_category")
    assert str(json_file) not in str(info.value)
    DatasetCatalog.remove("reliability_unknown_category") if "reliability_unknown_category" in (
        DatasetCatalog.list()
    ) else None


def test_check_test_images_names_each_file(broken_test_split, tiny_coco):
    register_coco_format(
        "eval_images_unit", broken_test_split.json_file, broken_test_split.image_root
    )
    found = find_unreadable_images("eval_images_unit", num_threads=2)
    assert found.num_images == 4 and [p[:2] for p in found.problems] == list(
        zip(broken_test_split.bad_ids, broken_test_split.bad)
    )
    with pytest.raises(DatasetError) as info:
        check_test_images(["eval_images_unit"])
    message = str(info.value)
    assert all(path in message for path in broken_test_split.bad)
    assert broken_test_split.json_file in message and "2 of its 4 images" in message
    assert "dataset.skip_unreadable_test_images=True" in message
    assert check_test_images("eval_images_unit", skip_unreadable=True) == [found]
    # A clean split: nothing found, nothing changed.
    register_coco_format("eval_images_clean", tiny_coco.json_file, tiny_coco.image_root)
    assert check_test_images("eval_images_clean") == []
    # The readable subset: the dicts of the other images, the same metadata.
    name = register_readable_subset(found)
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 2 and not {d["file_name"] for d in dicts} & set(broken_test_split.bad)
    assert MetadataCatalog.get(name).json_file == broken_test_split.json_file
    assert MetadataCatalog.get(name).evaluated_image_ids == sorted(d["image_id"] for d in dicts)


def test_rle_masks_need_the_bitmask_format(coco):
    """A training json whose masks are RLEs (not crowd) stops before training with the option
    to set, unless the mapper already reads bitmasks; RLE crowd regions are fine either way."""
    from conftest import ROOT
    from detectron2.config import LazyConfig

    from hiera_det.data.datasets import check_mask_format

    json_file, root, content = coco
    image = {img["id"]: img for img in content["images"]}[content["annotations"][0]["image_id"]]
    rle = {
        "size": [image["height"], image["width"]],
        "counts": [10, 5, image["height"] * image["width"] - 15],
    }
    content["annotations"][0].update(segmentation=rle, iscrowd=1)
    write_json(json_file, content)
    cfg = LazyConfig.load(str(ROOT / "configs/mask_rcnn_hiera_t.py"))
    report = validate_coco_json(str(json_file), str(root))
    assert report.rle_masks == [] and report.skipped_annotations == {}
    check_mask_format(cfg, [report])
    content["annotations"][0]["iscrowd"] = 0
    write_json(json_file, content)
    report = validate_coco_json(str(json_file), str(root))
    assert report.rle_masks == [content["annotations"][0]["id"]]
    with pytest.raises(DatasetError, match="1 annotations .* RLE.*instance_mask_format=bitmask"):
        check_mask_format(cfg, [report])
    cfg.dataloader.train.mapper.instance_mask_format = "bitmask"
    check_mask_format(cfg, [report])
