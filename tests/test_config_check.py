"""Bad config files and command-line overrides (hiera_det.config_check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hiera_det.config_check import ConfigOverrideError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/mask_rcnn_hiera_b.py")


def test_valid_overrides_apply():
    cfg = load_config(
        CONFIG,
        [
            "train.max_iter=10",
            "optimizer.lr=1",  # an int where a float was: fine
            "train.output_dir=out/run1",
            "model.backbone.bottom_up.stages=[1,1,3,1]",
            "model.backbone.bottom_up.use_act_checkpoint=True",  # a Hiera argument not in the file
            "dataloader.train.mapper.augmentations.1.target_height=128",
            "train.init_checkpoint=",
            "+train.my_note=hello",
            "dataset.train=[mine,/data/train.json,/data/images]",
            "model.roi_heads.num_classes=null",
            "model.backbone.norm=LN",  # a LazyCall'd object replaced by a name Detectron2 takes
        ],
    )
    assert cfg.train.max_iter == 10 and cfg.optimizer.lr == 1
    assert cfg.model.backbone.bottom_up.use_act_checkpoint is True
    assert cfg.dataloader.train.mapper.augmentations[1].target_height == 128
    assert cfg.train.my_note == "hello" and cfg.dataset.train[0] == "mine"
    assert cfg.model.backbone.norm == "LN"


@pytest.mark.parametrize(
    "override, says",
    [
        ("train.max_itr=10", "unknown config key 'train.max_itr'.* Did you mean 'train.max_iter'"),
        ("train.max_itr=10", r"write \+train.max_itr=10"),
        ("trian.max_iter=10", "Did you mean 'train.max_iter'"),
        (
            "model.proposal_generator.head.conv_dim=[1]",
            "Did you mean .*'model.proposal_generator.head.conv_dims'",
        ),
        ("model.roi_heads.box_head.conv_dim=[1]", "box_head takes: .*conv_dims"),
        ("train.max_iter=abc", "'train.max_iter' .* expects a int \\(now 184375\\), got 'abc'"),
        ("train.max_iter=1.5", "expects a int"),
        ("optimizer.lr=fast", "expects a float .* write a number"),
        ("train.amp.enabled=1", "expects a bool"),
        ("train.output_dir=123", "quote it"),
        ("model.roi_heads.box_head.conv_dims=3", "expects a list"),
        ("model.backbone=3", "expects a config node"),
        ("train.max_iter=[1,", "cannot parse the override 'train.max_iter=\\[1,'"),
    ],
)
def test_bad_overrides_name_key_and_value(override, says):
    with pytest.raises(ConfigOverrideError, match=says) as info:
        load_config(CONFIG, [override])
    assert "\n" not in str(info.value)  # one paragraph


def test_missing_config_file_suggests_close_names():
    with pytest.raises(FileNotFoundError, match="mask_rcnn_hiera_b.py"):
        load_config(str(ROOT / "configs/mask_rcnn_hiera_bb.py"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(str(ROOT / "nowhere/x.py"))


def test_train_net_rejects_a_typo_before_building_anything(tmp_path):
    """End to end: the error reaches the user as one message, before any model is built."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train_net.py"),
            "--config-file",
            CONFIG,
            "train.max_itr=10",
            f"train.output_dir={tmp_path}",
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "unknown config key 'train.max_itr'" in result.stderr
    assert "Did you mean 'train.max_iter'" in result.stderr


# Every entry point that takes overrides goes through `load_config`: a typo is an error naming it.
TYPO = "model.roi_heads.box_predictor.test_score_thres=0.3"
SAYS = "unknown config key 'model.roi_heads.box_predictor.test_score_thres'"


def test_predictor_cfg_rejects_a_typo(tmp_path):
    from hiera_det.predictor import predictor_cfg

    weights = tmp_path / "model.pth"
    weights.write_bytes(b"")  # never read: the config is checked first
    with pytest.raises(ConfigOverrideError, match=SAYS):
        predictor_cfg(CONFIG, str(weights), [TYPO])


def test_demo_rejects_a_typo(tmp_path):
    import cv2
    import numpy as np
    from conftest import load_script

    demo = load_script("demo.py", "demo_typo")
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    args = ["--config-file", CONFIG, "--input", str(image), "--output", str(tmp_path / "out")]
    with pytest.raises(ConfigOverrideError, match=SAYS):
        demo.main([*args, "--weights", str(image), "--opts", TYPO])


@pytest.mark.parametrize(
    "tool",
    [
        ["tools/benchmark.py", "--config-file", CONFIG, "--opts", TYPO],
        ["tools/analyze_detector.py", "--config-file", CONFIG, TYPO],
    ],
    ids=["benchmark", "analyze_detector"],
)
def test_tools_reject_a_typo_before_building_anything(tool):
    result = subprocess.run(
        [sys.executable, *tool], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert SAYS in result.stderr and "Did you mean" in result.stderr
    assert "Traceback" not in result.stderr
