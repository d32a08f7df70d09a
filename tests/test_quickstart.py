"""configs/quickstart.py: what it sets, and train_net.py runs it end to end (train a few
iterations, evaluate, draw pictures) on a tiny synthetic dataset."""

import json
from pathlib import Path

import cv2
import pytest
from conftest import load_script
from detectron2.config import LazyConfig, instantiate

from hiera_det.data.synthetic import SyntheticSpec, register_synthetic
from hiera_det.engine.visualize import PredictionPicturesHook, drawing_scale
from hiera_det.modeling import Hiera

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.py"
# The quickstart's image size, but a handful of images.
TINY = SyntheticSpec(num_train=6, num_val=3, image_size=(128, 128), seed=3)


def load_train_net():
    return load_script("train_net.py", "train_net")


def test_config_is_a_small_hiera_on_the_synthetic_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    cfg = LazyConfig.load(str(CONFIG))
    assert not any(tmp_path.iterdir())  # loading the config generates nothing
    assert cfg.dataloader.train.dataset.names == "synthetic_train"
    assert cfg.dataloader.test.dataset.names == "synthetic_val"
    assert cfg.dataloader.evaluator.dataset_name == "synthetic_val"
    assert cfg.model.roi_heads.num_classes == len(SyntheticSpec().shapes)
    assert cfg.train.init_checkpoint == ""  # from scratch: nothing to download
    model = instantiate(cfg.model)
    assert isinstance(model.backbone.bottom_up, Hiera)
    assert sum(p.numel() for p in model.parameters()) < 5e6
    (hook,) = [instantiate(h) for h in cfg.train.extra_hooks]
    assert isinstance(hook, PredictionPicturesHook) and hook.dataset_name == "synthetic_val"


def test_train_net_trains_evaluates_and_draws(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "unused"))
    train_name, val_name = register_synthetic(TINY, tmp_path / "synthetic", prefix="qs_test")
    out = tmp_path / "out"
    opts = [
        f"dataloader.train.dataset.names={train_name}",
        f"dataloader.test.dataset.names={val_name}",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "train.max_iter=3",
        # Keep the low-scoring detections of a barely trained model, so that both COCO tasks
        # (bbox, segm) have predictions to evaluate.
        "model.roi_heads.box_predictor.test_score_thresh=0.0",
        "train.log_period=1",
        "train.extra_hooks.0.num_images=2",
        "train.extra_hooks.0.score_threshold=0.0",
        f"train.output_dir={out}",
    ]
    train_net = load_train_net()
    args = train_net.default_argument_parser().parse_args(["--config-file", str(CONFIG), *opts])
    train_net.main(args)

    assert (out / "model_final.pth").is_file()
    lines = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    losses = [m for m in lines if "total_loss" in m]
    assert [m["iteration"] for m in losses] == [0, 1, 2]
    assert all(m["total_loss"] > 0 for m in losses)
    # Evaluation ran on the val split after the last iteration: COCO AP for boxes and masks.
    evals = [m for m in lines if "bbox/AP" in m]
    assert len(evals) == 1 and "segm/AP" in evals[0]
    # Pictures: ground truth | prediction for the first val images, upscaled to be legible.
    pictures = sorted((out / "predictions").glob("*.png"))
    assert [p.name for p in pictures] == ["000000.png", "000001.png"]
    side = round(128 * drawing_scale(128, 128))
    assert cv2.imread(str(pictures[0])).shape == (side, 2 * side, 3)
