"""Epochs -> iterations (hiera_det.engine.schedule): ViTDet's step schedule, the MAE recipe's
conversion with its config, registered-dataset counting and periods in epochs."""

import pytest
from conftest import ROOT
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from omegaconf import OmegaConf

from hiera_det.engine.schedule import (
    count_training_images,
    iterations_for,
    resolve_epoch_schedule,
    step_lr_multiplier,
)


def test_vitdet_step_schedule_numbers():
    assert iterations_for(epochs=100, batch_size=64) == 184375
    assert iterations_for(epochs=100, batch_size=64, images=100_000) == 156250
    lr = step_lr_multiplier(184375)
    assert list(lr.scheduler.milestones) == [163889, 177546]
    assert lr.warmup_length * 184375 == pytest.approx(250)
    scheduler = instantiate(lr)
    assert scheduler(0.0) == pytest.approx(0.001)
    assert scheduler(0.5) == 1.0 and scheduler(170_000 / 184375) == pytest.approx(0.1)
    assert scheduler(180_000 / 184375) == pytest.approx(0.01)


def _cfg(**train):
    return OmegaConf.create(
        {
            "train": {"max_iter": None, "eval_period": None, "checkpointer": {"period": None}}
            | train,
            "dataloader": {"train": {"total_batch_size": 4, "dataset": {"names": "x"}}},
            "optimizer": {"lr": None},
            "lr_multiplier": {"warmup_length": None},
        }
    )


def test_registered_datasets_count_and_periods_in_epochs():
    """A detection-style config: images from the registered dicts, periods in epochs."""
    names = ["schedule_test_a", "schedule_test_b"]
    DatasetCatalog.register(names[0], lambda: [{}] * 30)
    DatasetCatalog.register(names[1], lambda: [{}] * 13)
    try:
        cfg = _cfg(epochs=10, warmup_epochs=1, base_lr=0.1, checkpoint_epochs=2, eval_epochs=5)
        cfg.dataloader.train.dataset.names = names
        assert count_training_images(cfg.dataloader.train) == 43
        resolve_epoch_schedule(cfg)
    finally:
        for name in names:
            DatasetCatalog.remove(name)
    # 43 // 4 = 10 iterations per epoch.
    assert (cfg.train.max_iter, cfg.train.checkpointer.period, cfg.train.eval_period) == (
        100,
        20,
        50,
    )
    assert cfg.lr_multiplier.warmup_length == pytest.approx(0.1)
    assert cfg.optimizer.lr == pytest.approx(0.1 * 4 / 256)


def test_a_missing_image_folder_names_the_key(tmp_path):
    cfg = _cfg(epochs=1)
    cfg.dataloader.train.root = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dataloader.train.root: .*nowhere' does not exist"):
        resolve_epoch_schedule(cfg)


def test_epoch_schedule_converts_the_imagenet_recipe():
    cfg = LazyConfig.load(str(ROOT / "configs/mae/mae_hiera_b.py"))
    resolve_epoch_schedule(cfg, num_images=1_281_167)
    assert cfg.train.max_iter == 400 * 312  # 1281167 // 4096 = 312 iterations per epoch
    assert cfg.lr_multiplier.warmup_length == pytest.approx(0.1)
    assert cfg.optimizer.lr == pytest.approx(8e-4)
    assert cfg.train.checkpointer.period == 20 * 312

    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(str(ROOT / "configs/mae/mae_hiera_b.py")),
        ["dataloader.train.total_batch_size=256", "train.epochs=1600"],
    )
    resolve_epoch_schedule(cfg, num_images=1_281_167)
    assert cfg.train.max_iter == 1600 * 5004
    assert cfg.optimizer.lr == pytest.approx(8e-4 * 256 / 4096)
    assert cfg.lr_multiplier.warmup_length == pytest.approx(40 / 1600)
    scheduler = instantiate(cfg.lr_multiplier)
    assert scheduler(0.0) == 0.0 and scheduler(40 / 1600) == pytest.approx(1.0)
    assert scheduler(1.0) == pytest.approx(0.0, abs=1e-9)
    assert scheduler(0.5 + 20 / 1600) == pytest.approx(0.5)  # cosine midpoint after warm-up


def test_epoch_schedule_keeps_an_explicit_max_iter_and_skips_configs_without_epochs():
    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(str(ROOT / "configs/mae/mae_hiera_t.py")), ["train.max_iter=7"]
    )
    resolve_epoch_schedule(cfg, num_images=100)
    assert cfg.train.max_iter == 7
    cfg.train.epochs = None
    cfg.train.max_iter = 11
    cfg.optimizer.lr = 1.0
    resolve_epoch_schedule(cfg, num_images=100)
    assert (cfg.train.max_iter, cfg.optimizer.lr) == (11, 1.0)

    cfg.train.epochs, cfg.train.checkpointer.period = 100, 3  # an explicit period stays
    resolve_epoch_schedule(cfg, num_images=100)
    assert cfg.train.checkpointer.period == 3


def test_detection_config_in_epochs_follows_the_dataset_and_the_batch(caplog):
    """``train.epochs=12`` on a COCO recipe config for a registered dataset of 250 images at
    batch 8: 31 iterations per epoch; lr scaled from the recipe's batch 64; ViTDet's decays at the
    same fractions; evaluation and checkpoints in epochs; the log says it in one sentence."""
    name = "schedule_test_own_data"
    DatasetCatalog.register(name, lambda: [{}] * 250)
    overrides = [
        f"dataloader.train.dataset.names={name}",
        "dataloader.train.total_batch_size=8",
        "train.epochs=12",
        "train.warmup_epochs=1",
        "train.eval_epochs=2",
        "train.checkpoint_epochs=4",
    ]
    try:
        cfg = LazyConfig.load(str(ROOT / "configs/sam2/mask_rcnn_hiera_b_plus.py"))
        recipe_lr = cfg.optimizer.lr
        cfg = LazyConfig.apply_overrides(cfg, overrides)
        with caplog.at_level("INFO", logger="hiera_det.engine.schedule"):
            resolve_epoch_schedule(cfg, given=[o.split("=")[0] for o in overrides])
    finally:
        DatasetCatalog.remove(name)
    assert cfg.train.max_iter == 12 * 31
    assert cfg.optimizer.lr == pytest.approx(recipe_lr * 8 / 64)
    assert (cfg.train.eval_period, cfg.train.checkpointer.period) == (62, 124)
    assert cfg.lr_multiplier.warmup_length == pytest.approx(1 / 12)
    scheduler = instantiate(cfg.lr_multiplier)
    assert scheduler(0.5) == 1.0
    assert scheduler(0.9) == pytest.approx(0.1) and scheduler(0.97) == pytest.approx(0.01)
    (sentence,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Schedule")]
    assert "250 training images at batch 8 (31 iterations per epoch) -> 372 iterations" in sentence
    assert "evaluation every 62" in sentence and "x0.1 at iterations 331, 358" in sentence


def test_detection_keys_given_in_iterations_stay():
    """A detection config's own iterations give way to train.epochs; the same keys given on the
    command line stay, and without train.epochs nothing changes (the COCO recipe)."""
    cfg = LazyConfig.load(str(ROOT / "configs/mask_rcnn_hiera_b.py"))
    resolve_epoch_schedule(cfg, num_images=1000, given=[])
    assert (cfg.train.max_iter, cfg.train.eval_period) == (184375, 5000)
    cfg.train.epochs, cfg.train.max_iter, cfg.optimizer.lr = 3, 10, 1e-4
    resolve_epoch_schedule(cfg, num_images=1000, given=["train.max_iter", "optimizer.lr"])
    assert (cfg.train.max_iter, cfg.optimizer.lr, cfg.train.eval_period) == (10, 1e-4, 5000)
