"""Unreadable test images: train_net.py checks every image of the test split before the run and
stops naming them (no traceback), or with dataset.skip_unreadable_test_images=True evaluates the
readable ones and says so; an image that breaks during the run fails the evaluation in one line
naming it and its dataset, after a checkpoint of that iteration was saved."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import shrink_overrides
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

from hiera_det.data.datasets import register_coco_format, register_readable_subset
from hiera_det.data.images import BadImageError, check_image_file
from hiera_det.data.validation import DatasetError, check_test_images, find_unreadable_images
from hiera_det.engine.evaluation import ImageSubsetEvaluator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_net  # noqa: E402

ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    "OMP_NUM_THREADS": "1",
}
TIMEOUT = 900  # seconds; a run takes ~1 min on a quiet 2-core machine, several when it is loaded


def _copy(tiny_coco, folder: Path) -> SimpleNamespace:
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
    data = _copy(tiny_coco, tmp_path / "test")
    truncated, missing = (Path(data.image_root) / data.images[i]["file_name"] for i in (1, 2))
    truncated.write_bytes(truncated.read_bytes()[:-200])
    missing.unlink()
    data.bad = [str(truncated), str(missing)]
    data.bad_ids = [data.images[1]["id"], data.images[2]["id"]]
    return data


def _arguments(tiny_coco, test, out: Path, *extra: str) -> list[str]:
    return [
        "--config-file", str(ROOT / "configs/mask_rcnn_hiera_t.py"), *shrink_overrides(128),
        f"dataset.train=[eval_images_train,{tiny_coco.json_file},{tiny_coco.image_root}]",
        f"dataset.test=[eval_images_{out.parent.name[-24:]},{test.json_file},{test.image_root}]",
        f"train.output_dir={out}", "train.log_period=1", "train.max_iter=1", *extra,
    ]  # fmt: skip


def _run(arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train_net.py"), *arguments],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip


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


def test_subset_evaluator_scores_only_its_images(tiny_coco, tmp_path):
    """Perfect predictions for 2 of the 4 images: pycocotools' AP is 100 on those 2 images, and
    lower on all 4 (the other images' objects count as missed), as COCOEvaluator computes it."""
    register_coco_format("eval_images_ap", tiny_coco.json_file, tiny_coco.image_root)
    dicts = DatasetCatalog.get("eval_images_ap")
    to_contiguous = MetadataCatalog.get("eval_images_ap").thing_dataset_id_to_contiguous_id
    kept = dicts[:2]

    def run(evaluator) -> float:
        evaluator.reset()
        for d in kept:
            instances = Instances((d["height"], d["width"]))
            boxes = [
                BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in d["annotations"]
            ]
            instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
            instances.scores = torch.ones(len(boxes))
            instances.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
            evaluator.process([{"image_id": d["image_id"]}], [{"instances": instances}])
        return evaluator.evaluate()["bbox"]["AP"]

    def coco_evaluator():
        return COCOEvaluator("eval_images_ap", tasks=("bbox",), output_dir=str(tmp_path))

    assert to_contiguous  # the dicts' category ids are contiguous ones, as predictions'
    whole = run(coco_evaluator())
    subset = run(ImageSubsetEvaluator(coco_evaluator(), [d["image_id"] for d in kept], "note"))
    assert subset == pytest.approx(100.0) and whole < 90.0


def test_broken_test_split_stops_before_training(tiny_coco, broken_test_split, tmp_path):
    out = tmp_path / "out"
    run = _run(_arguments(tiny_coco, broken_test_split, out))
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    message = run.stderr[run.stderr.index("DatasetError: ") :]
    assert all(path in message for path in broken_test_split.bad), message
    assert broken_test_split.json_file in message and "skip_unreadable_test_images=True" in message
    assert not (out / "metrics.json").exists() and "Starting training" not in run.stderr
    # The report of the test split's json speaks of evaluation.
    head = f"{broken_test_split.json_file}: 4 images"
    report = [line for line in (run.stdout + run.stderr).splitlines() if head in line][0]
    assert "evaluation" in report and "training skips" not in report, report
    # --eval-only stops the same way.
    run = _run(["--eval-only", *_arguments(tiny_coco, broken_test_split, out)])
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert all(path in run.stderr for path in broken_test_split.bad)


def test_skip_unreadable_evaluates_the_readable_images(tiny_coco, broken_test_split, tmp_path):
    out = tmp_path / "out"
    skip = "dataset.skip_unreadable_test_images=True"
    note = f"2 of the 4 images of 'eval_images_{tmp_path.name[-24:]}' are left out"
    # Training (1 iteration), evaluated at the end; then --eval-only of its checkpoint.
    train_net.main(
        default_argument_parser().parse_args([*_arguments(tiny_coco, broken_test_split, out), skip])
    )
    weights = f"train.init_checkpoint={out / 'model_final.pth'}"
    args = [*_arguments(tiny_coco, broken_test_split, out), skip, weights]
    results = train_net.main(default_argument_parser().parse_args(["--eval-only", *args]))
    assert set(results) == {"bbox", "segm"}
    log = (out / "log.txt").read_text()
    assert log.count("NOT over the whole test set") == 4 and log.count(note) == 4
    # Each evaluation: after the AP tables and after print_csv_format's lines.
    for run in log.split("Evaluation results for bbox")[1:]:
        assert run.rindex(note) > run.rindex("copypaste:") > run.index(note)
        assert run.index(note) > run.index("Evaluation results for segm")
    # A misspelt option is an error, not ignored.
    args[-2] = "dataset.skip_unreadable_test_image=True"
    with pytest.raises(KeyError, match="dataset.skip_unreadable_test_image;"):
        train_net.main(default_argument_parser().parse_args(["--eval-only", *args]))


def test_image_broken_during_training_names_it_after_a_checkpoint(tiny_coco, tmp_path):
    test = _copy(tiny_coco, tmp_path / "test")
    out = tmp_path / "out"
    path = Path(test.image_root) / test.images[1]["file_name"]
    hook = f"train.extra_hooks=[{{_target_:reliability_hooks.TruncateFile,path:'{path}'}}]"
    # Evaluation after iteration 0; the periodic checkpoints would come only at 5 and the end.
    extra = ["train.max_iter=3", "train.eval_period=1", "train.checkpointer.period=5", hook]
    run = _run(_arguments(tiny_coco, test, out, *extra))
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("hiera_det.data.images.BadImageError: evaluating dataset"), last
    assert str(path) in last and "eval_images_" in last and "truncated" in last, last
    saved = torch.load(out / "model_0000000.pth", weights_only=False)
    assert saved["iteration"] == 0
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    assert all(np.isfinite(v.numpy()).all() for v in saved["model"].values())
