"""The built-in synthetic dataset: deterministic, exact masks, cached, registered for Detectron2."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from hiera_det.data import synthetic
from hiera_det.data.synthetic import SyntheticSpec, draw_image, ensure_synthetic, register_synthetic

SPEC = SyntheticSpec(num_train=6, num_val=3, image_size=(64, 96), objects=(3, 6), seed=7)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = _files(ensure_synthetic(SPEC, tmp_path / "a", progress=False))
    b = _files(ensure_synthetic(SPEC, tmp_path / "b", progress=False))
    assert len(a) == 1 + 2 + SPEC.num_train + SPEC.num_val  # stamp, 2 jsons, images
    assert a == b
    other = SyntheticSpec(**{**SPEC.__dict__, "seed": 8})
    c = _files(ensure_synthetic(other, tmp_path / "c", progress=False))
    assert a.keys() - {"stamp.json"} == c.keys() - {"stamp.json"}
    assert a["train/000000.png"] != c["train/000000.png"]


def test_masks_are_exact_and_match_the_pixels(tmp_path):
    root = ensure_synthetic(SPEC, tmp_path, progress=False)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(SPEC.shapes)
    num_instances = 0
    for image in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        masks = [mask_util.decode(a["segmentation"]).astype(bool) for a in anns]
        # The json equals what the generator drew, and the PNG holds the drawn pixels.
        rng = np.random.default_rng([SPEC.seed, 0, image["id"] - 1])
        drawn, classes, drawn_masks = draw_image(SPEC, rng)
        png = cv2.imread(str(root / "train" / image["file_name"]))[:, :, ::-1]
        np.testing.assert_array_equal(png, drawn)
        assert [a["category_id"] - 1 for a in anns] == classes
        for a, m, d in zip(anns, masks, drawn_masks):
            np.testing.assert_array_equal(m, d)
            assert m.shape == SPEC.image_size
            assert a["area"] == m.sum() >= SPEC.min_area
            ys, xs = np.nonzero(m)
            x0, y0 = xs.min(), ys.min()
            assert a["bbox"] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1]
        if masks:  # occlusion resolved: no pixel belongs to two instances
            assert (np.sum(masks, axis=0) <= 1).all()
        num_instances += len(anns)
    assert num_instances >= SPEC.num_train * SPEC.objects[0] // 2


def test_occlusion_cuts_earlier_masks():
    spec = SyntheticSpec(image_size=(64, 64), objects=(8, 8), object_size=(0.4, 0.5))
    cut = 0
    for i in range(10):
        _, _, masks = draw_image(spec, np.random.default_rng(i))
        # A cut mask is not convex-filled any more: its area is below its own convex hull's.
        for m in masks:
            hull = cv2.convexHull(np.argwhere(m)[:, ::-1].astype(np.int32))
            filled = np.zeros(m.shape, np.uint8)
            cv2.fillConvexPoly(filled, hull, 1)
            cut += int(filled.sum() > 1.3 * m.sum())
    assert cut > 0


def test_cache_hit_does_not_regenerate_and_change_does(tmp_path, monkeypatch):
    ensure_synthetic(SPEC, tmp_path, progress=False)
    before = _files(tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a cached dataset")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "_annotation_json", fail)
        ensure_synthetic(SPEC, tmp_path, progress=False)
    assert _files(tmp_path) == before

    smaller = SyntheticSpec(**{**SPEC.__dict__, "num_train": 2})
    ensure_synthetic(smaller, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000000.png", "000001.png"]
    assert json.loads((tmp_path / "stamp.json").read_text()) == smaller.stamp()


def test_register_generates_on_first_use(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = tmp_path / "syn"
    train, val = register_synthetic(SPEC, root, prefix="test_synthetic")
    assert (train, val) == ("test_synthetic_train", "test_synthetic_val")
    assert not root.exists()  # registering alone writes nothing ...
    assert MetadataCatalog.get(val).thing_classes == list(SPEC.shapes)
    assert "json_file" not in MetadataCatalog.get(val).as_dict()  # ... and names no files yet
    dicts = DatasetCatalog.get(val)
    assert len(dicts) == SPEC.num_val and (root / "stamp.json").is_file()
    for name in (train, val):  # now the files exist for both splits
        assert Path(MetadataCatalog.get(name).json_file).is_file()
    assert all(Path(d["file_name"]).is_file() for d in dicts)
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= set(range(5))
    # Registering again (another spec) replaces the first registration.
    register_synthetic(SyntheticSpec(**{**SPEC.__dict__, "num_val": 1}), root, "test_synthetic")
    assert "json_file" not in MetadataCatalog.get(val).as_dict()  # a stale cache is not named
    assert len(DatasetCatalog.get(val)) == 1
    register_synthetic(SyntheticSpec(**{**SPEC.__dict__, "num_val": 1}), root, "test_synthetic")
    assert Path(MetadataCatalog.get(val).json_file).is_file()  # a cached one is, at once


def test_cli(tmp_path, capsys):
    synthetic.main(["--output", str(tmp_path), "--num-train", "2", "--num-val", "1"])
    assert "ready" in capsys.readouterr().out
    assert len(list((tmp_path / "train").glob("*.png"))) == 2


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="shapes"):
        SyntheticSpec(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="objects"):
        SyntheticSpec(objects=(3, 2))


def test_processes_that_ask_at_once_wait_for_one_writer(tmp_path):
    """The ranks of a run all load the dataset on first use: one writes it, the others wait for
    it (before, the second process failed on the first one's folders)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(
            target=ensure_synthetic, args=(SPEC, tmp_path / "data"), kwargs={"progress": False}
        )
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert json.loads((tmp_path / "data" / "stamp.json").read_text()) == SPEC.stamp()
    reference = tmp_path / "reference"
    ensure_synthetic(SPEC, reference, progress=False)
    assert _files(tmp_path / "data") == _files(reference)
