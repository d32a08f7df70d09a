"""train_net.py end to end on a tiny COCO-format dataset, one process: train, resume, evaluate;
datasets that are missing or broken stop before training; unreadable test images stop the run
naming them, or are left out on request, or (changed during training) end it after a checkpoint.
Kill/resume exactness: test_train_net_resume.py; stop signals: test_train_net_stop.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_tiny_coco, load_script, shrink_overrides, write_tiny_coco
from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser

from hiera_det.data import validation
from hiera_det.data.datasets import apply_dataset_config

ROOT = Path(__file__).resolve().parents[1]
train_net = load_script("train_net.py", "train_net")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


def arguments(tiny_coco, out: Path, *extra: str) -> list[str]:
    data = f"{tiny_coco.json_file},{tiny_coco.image_root}"
    return [
        "--config-file",
        str(ROOT / "configs/mask_rcnn_hiera_t.py"),
        *shrink_overrides(128),
        f"dataset.train=[tiny_train_net,{data}]",
        f"dataset.test=[tiny_train_net,{data}]",
        f"train.output_dir={out}",
        "train.log_period=1",
        "train.checkpointer.period=2",
        "train.eval_period=0",  # evaluate after the last iteration only
        *extra,
    ]


def iterations(out: Path) -> list[int]:
    lines = (out / "metrics.json").read_text().splitlines()
    return [json.loads(line)["iteration"] for line in lines if '"total_loss"' in line]


def test_train_resume_evaluate(tiny_coco, tmp_path):
    out = tmp_path / "out"
    # 1. Train 2 iterations from the command line (argument parsing, launch, CPU fallback).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "train_net.py", *arguments(tiny_coco, out, "train.max_iter=2")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert iterations(out) == [0, 1]
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 1
    assert (out / "config.yaml").is_file()
    log = (out / "log.txt").read_text()
    assert "training in fp32 on the CPU" in log  # AMP (on in the config) needs CUDA
    assert "eta:" in log  # the console writer with ETA
    assert "Evaluation results for bbox" in log  # the end-of-training evaluation
    assert "COCO evaluation of tiny_train_net by faster-coco-eval" in log  # the configs' evaluator

    # 2. Resume to 3 iterations, with an extra hook given on the command line.
    extra_json = tmp_path / "extra_metrics.json"
    hook = (
        "train.extra_hooks=[{_target_:detectron2.engine.hooks.PeriodicWriter,period:1,"
        f"writers:[{{_target_:detectron2.utils.events.JSONWriter,json_file:{extra_json}}}]}}]"
    )
    args = default_argument_parser().parse_args(
        ["--resume", *arguments(tiny_coco, out, "train.max_iter=3", hook)]
    )
    train_net.main(args)
    assert iterations(out) == [0, 1, 2]  # continued from iteration 2, not restarted
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 2
    written = [json.loads(line) for line in extra_json.read_text().splitlines()]
    assert [m["iteration"] for m in written if "total_loss" in m] == [2]  # the resumed step

    # 3. Evaluate the checkpoint: COCO box and mask AP.
    args = default_argument_parser().parse_args(
        [
            "--eval-only",
            *arguments(tiny_coco, out, f"train.init_checkpoint={out / 'model_final.pth'}"),
        ]
    )
    results = train_net.main(args)
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert 0 <= results[task]["AP"] <= 100
    log = (out / "log.txt").read_text()
    # Printed at the end of training, of the resumed training and by --eval-only.
    assert log.count("Evaluation results for segm") == 3


def test_missing_coco_says_where_it_is_expected(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DETECTRON2_DATASETS": str(tmp_path)}
    command = [
        sys.executable,
        "train_net.py",
        "--config-file",
        "configs/mask_rcnn_hiera_b.py",
        f"train.output_dir={tmp_path / 'out'}",
    ]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith("FileNotFoundError: dataset 'coco_2017_train'")
    assert str(tmp_path / "coco/annotations/instances_train2017.json") in message
    assert "$DETECTRON2_DATASETS" in message and str(tmp_path) in message


def test_bad_dataset_argument(tiny_coco, tmp_path):
    cfg = LazyConfig.load(str(ROOT / "configs/mask_rcnn_hiera_b.py"))
    cfg = LazyConfig.apply_overrides(cfg, [f"dataset.train=[x,{tiny_coco.json_file}]"])
    with pytest.raises(ValueError, match=r"dataset.train=.*expected \[name,json_file,image_root\]"):
        apply_dataset_config(cfg)
    cfg.dataset.train = ["x", str(tmp_path / "nope.json"), tiny_coco.image_root]
    with pytest.raises(FileNotFoundError, match="nope.json"):
        apply_dataset_config(cfg)


def test_pre_training_check_parses_the_json_once(tmp_path, monkeypatch):
    """Registering a user's COCO json (train and test) and train_net's checks before training
    parse it once (Detectron2's loader parses it again when the training loader is built)."""
    data = write_tiny_coco(tmp_path)
    content = json.loads(Path(data.json_file).read_text())
    content["info"] = {"description": str(tmp_path)}  # bytes that no other test had checked
    text = json.dumps(content)
    Path(data.json_file).write_text(text)
    parses = []
    parse = validation._parse  # the checks' one parse (simdjson, or json)

    def counting_parse(json_file, data):
        parses.append(data.decode() == text)
        return parse(json_file, data)

    monkeypatch.setattr(validation, "_parse", counting_parse)
    entry = f"[parse_once,{data.json_file},{data.image_root}]"
    cfg = LazyConfig.load(str(ROOT / "configs/mask_rcnn_hiera_t.py"))
    cfg = LazyConfig.apply_overrides(cfg, [f"dataset.train={entry}", f"dataset.test={entry}"])
    apply_dataset_config(cfg)  # as train_net.main does, then its check
    train_net.check_datasets(cfg, eval_only=False)
    assert cfg.dataloader.train.dataset.names == "parse_once"
    assert parses.count(True) == 1


ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    "OMP_NUM_THREADS": "1",
}


TIMEOUT = 900  # seconds; a run takes ~1 min on a quiet 2-core machine, several when it is loaded


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
    test = copy_tiny_coco(tiny_coco, tmp_path / "test")
    out = tmp_path / "out"
    path = Path(test.image_root) / test.images[1]["file_name"]
    hook = f"train.extra_hooks=[{{_target_:run_hooks.TruncateFile,path:'{path}'}}]"
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


def test_epochs_schedule_keeps_the_best_model(tiny_coco, tmp_path):
    """``train.epochs`` on the 4-image dataset at batch 2: 2 iterations per epoch, evaluation
    every epoch; ``model_best.pth`` is the checkpoint of the evaluation with the best box AP (the
    first of equals), the one after the last iteration included."""
    out = tmp_path / "out"
    args = arguments(tiny_coco, out, "dataloader.train.total_batch_size=2", "train.epochs=3")
    args = [a for a in args if not a.startswith(("train.eval_period=", "train.max_iter="))]
    args += ["train.eval_epochs=1", "model.roi_heads.box_predictor.test_score_thresh=0.0"]
    train_net.main(default_argument_parser().parse_args(args))
    log = (out / "log.txt").read_text()
    assert "4 training images at batch 2 (2 iterations per epoch) -> 6 iterations" in log
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    evaluations = [(r["iteration"], r["bbox/AP"]) for r in rows if "bbox/AP" in r]
    # after each epoch; the one after training is logged at max_iter (Detectron2 counts it so)
    assert [it for it, _ in evaluations] == [1, 3, 6]
    best = max(evaluations, key=lambda e: (e[1], -e[0]))  # the first of the best
    assert torch.load(out / "model_best.pth", weights_only=True)["iteration"] == best[0]
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == 5
    assert (out / "last_checkpoint").read_text() == "model_final.pth"  # --resume goes on from it
