"""COCO instances files checked before training (hiera_det.data.validation): what stops the run
(naming the file and the ids), what training skips (counted and reported), and the check of every
test image before evaluation."""

from __future__ import annotations

import json

import pytest
from conftest import write_json
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

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
