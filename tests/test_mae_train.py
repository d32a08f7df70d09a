"""MAE pretraining end to end: configs, train_net.py, checkpoints -> detector, resume, pictures."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from detectron2.config import LazyConfig, instantiate
from PIL import Image

from hiera_det.checkpoint import HieraCheckpointer, load_hiera_checkpoint
from hiera_det.mae import resolve_epoch_schedule
from hiera_det.mae.model import build_mae
from hiera_det.mae.pictures import GAP, HEADER, render_reconstructions
from hiera_det.modeling import build_hiera

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"t": 0.0, "s": 0.0, "b": 0.2, "b_plus": 0.2, "l": 0.2, "h": 0.3}
SIZES = {"t": "tiny", "s": "small", "b": "base", "b_plus": "base_plus", "l": "large", "h": "huge"}
# Shrink a config's model and data to something a CPU trains in a second.
SHRINK = [
    "model.encoder.embed_dim=16",
    "model.encoder.num_heads=1",
    "model.encoder.pretrain_img_size=64",
    "model.decoder_embed_dim=32",
    "model.decoder_depth=2",
    "model.decoder_num_heads=4",
    "dataloader.train.img_size=64",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
]
TINY_STAGES = "model.encoder.stages=[1,1,2,1]"


def load_train_net():
    return load_script("train_net.py", "train_net")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of 7 generated images in two sub-folders, plus one corrupt file (8 files)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(7):
        folder = root / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        # Smooth random images (upsampled noise), so there is something to reconstruct.
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((96, 72), Image.BICUBIC).save(folder / f"{i}.png")
    (root / "class1" / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def run_train_net(config, opts, resume=False):
    train_net = load_train_net()
    argv = ["--config-file", str(ROOT / config)] + (["--resume"] if resume else []) + opts
    args = train_net.default_argument_parser().parse_args(argv)
    train_net.main(args)


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if "total_loss" in line]


# --- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_mae_config_follows_table_14a_and_runs_shrunk(name, tmp_path):
    cfg = LazyConfig.load(str(ROOT / f"configs/mae/mae_hiera_{name}.py"))
    enc = cfg.model.encoder
    assert (enc.size, enc.drop_path_rate, enc.q_pool) == (SIZES[name], CONFIGS[name], 2)
    m = cfg.model
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == (512, 8, 16)
    assert (m.mask_ratio, cfg.dataloader.train.scale, cfg.dataloader.train.img_size) == (
        0.6,
        (0.2, 1.0),
        224,
    )
    assert (cfg.optimizer.betas, cfg.optimizer.weight_decay) == ((0.9, 0.95), 0.05)
    assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.base_lr) == (400, 40, 8e-4)

    cfg = LazyConfig.apply_overrides(cfg, SHRINK)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    assert model.encoder.blocks[-1].drop_path.__class__.__name__ == (
        "DropPath" if CONFIGS[name] else "Identity"
    )
    losses = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(losses["loss_mae"])


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


# --- training with train_net.py ----------------------------------------------------------------


def test_train_net_pretrains_then_the_detector_backbone_loads_every_weight(
    images, tmp_path, caplog
):
    out = tmp_path / "run"
    opts = SHRINK + [
        TINY_STAGES,
        f"dataloader.train.root={images}",
        f"train.output_dir={out}",
        "train.device=cpu",
        "train.log_period=1",
        "train.checkpointer.period=2",
        "train.extra_hooks.0.period=2",
        "train.extra_hooks.0.num_images=2",
    ]
    with caplog.at_level(logging.WARNING, logger="hiera_det.mae.data"):
        # One epoch: 8 listed files (one corrupt) // batch 2 = 4 iterations, set by train_net.py.
        # An epoch is one permutation of all 8, so the corrupt file is drawn whatever the seed.
        run_train_net(
            "configs/mae/mae_hiera_t.py", opts + ["train.epochs=1", "train.warmup_epochs=0"]
        )
    rows = metrics(out)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert all(np.isfinite(r["total_loss"]) for r in rows)
    assert (out / "model_0000001.pth").is_file() and (out / "model_final.pth").is_file()

    # Pictures after iterations 2 and 4 (the last one).
    for it in (2, 4):
        picture = np.asarray(Image.open(out / "pictures" / f"iter_{it:07d}.png"))
        assert picture.shape == (HEADER + 2 * (64 + GAP), 4 * (64 + GAP) + GAP, 3)

    # The corrupt file is reported by path, with a count, and training went on.
    skipped = [r.getMessage() for r in caplog.records if "Skipped unreadable" in r.getMessage()]
    assert skipped and all("corrupt.jpg" in m for m in skipped)
    assert f"({len(skipped)} skipped so far" in skipped[-1]

    # The checkpoint goes straight into a detection Hiera of the same size.
    detector_backbone = build_hiera("tiny", embed_dim=16, stages=(1, 1, 2, 1), pretrain_img_size=64)
    report = load_hiera_checkpoint(detector_backbone, str(out / "model_final.pth"))
    assert report.missing == [] and report.unexpected == []
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    for key, value in detector_backbone.state_dict().items():
        assert torch.equal(value, saved[f"encoder.{key}"]), key

    # Resume: iterations 4 and 5 only, starting from the saved weights and iteration.
    run_train_net("configs/mae/mae_hiera_t.py", opts + ["train.max_iter=6"], resume=True)
    assert [r["iteration"] for r in metrics(out)] == [0, 1, 2, 3, 4, 5]
    resumed = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert resumed["iteration"] == 5
    assert not torch.equal(resumed["model"]["mask_token"], saved["mask_token"])  # it trained on

    # The pictures command works on the checkpoint.
    png = tmp_path / "pictures.png"
    load_script("tools/mae_pictures.py", "mae_pictures").main(
        [
            "--config-file",
            str(ROOT / "configs/mae/mae_hiera_t.py"),
            "--checkpoint",
            str(out / "model_final.pth"),
            "--input",
            str(images),
            "--output",
            str(png),
            "--num-images",
            "3",
            "--device",
            "cpu",
            *SHRINK,
            TINY_STAGES,
        ]
    )
    assert np.asarray(Image.open(png)).shape == (HEADER + 3 * (64 + GAP), 4 * (64 + GAP) + GAP, 3)


# --- pictures ----------------------------------------------------------------------------------


def test_picture_grid_shows_input_masked_and_pastes_visible_units_back():
    torch.manual_seed(0)
    model = build_mae(
        "tiny", embed_dim=16, stages=(1, 1, 2, 1), pretrain_img_size=64, decoder_embed_dim=32,
        decoder_depth=1, decoder_num_heads=4,
    )  # fmt: skip
    images = torch.randn(2, 3, 64, 64).clamp(-1.5, 1.5)
    visible = torch.tensor([[True, False, False, True], [False, True, True, False]])
    grid = render_reconstructions(model, images, visible)
    assert grid.dtype == np.uint8 and grid.shape == (HEADER + 2 * 68, 4 * 68 + GAP, 3)

    def tile(row, col):
        y, x = HEADER + row * 68, GAP + col * 68
        return grid[y : y + 64, x : x + 64].astype(int)

    for row in range(2):
        original, masked, pasted = tile(row, 0), tile(row, 1), tile(row, 3)
        for unit, vis in enumerate(visible[row].tolist()):
            sl = np.s_[
                (unit // 2) * 32 : (unit // 2 + 1) * 32, (unit % 2) * 32 : (unit % 2 + 1) * 32
            ]
            assert np.array_equal(pasted[sl], original[sl]) == vis
            assert np.array_equal(masked[sl], original[sl]) == vis
    assert model.training  # restored after drawing


def test_picture_tool_rejects_an_unknown_config_key(images, tmp_path):
    from hiera_det.config_check import ConfigOverrideError

    tool = load_script("tools/mae_pictures.py", "mae_pictures")
    args = ["--config-file", str(ROOT / "configs/mae/mae_hiera_t.py"), "--checkpoint", "x.pth"]
    args += ["--input", str(images), "--output", str(tmp_path / "p.png"), "model.mask_ratoi=0.5"]
    with pytest.raises(ConfigOverrideError, match="mask_ratoi"):
        tool.main(args)


def test_official_mae_checkpoint_loads_for_pictures(tmp_path):
    hiera_mae = pytest.importorskip("hiera.hiera_mae")
    torch.manual_seed(0)
    ref = hiera_mae.MaskedAutoencoderHiera(
        input_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 1, 2, 1), q_pool=2,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4,
    )  # fmt: skip
    path = tmp_path / "mae_official.pth"
    torch.save({"model_state": ref.state_dict()}, path)
    ours = build_mae(
        "tiny", embed_dim=16, stages=(1, 1, 2, 1), pretrain_img_size=64, decoder_embed_dim=32,
        decoder_depth=1, decoder_num_heads=4,
    )  # fmt: skip
    HieraCheckpointer(ours, strict=True).load(str(path))
    torch.testing.assert_close(ours.encoder.pos_embed, ref.pos_embed)
    torch.testing.assert_close(ours.decoder_pred.weight, ref.decoder_pred.weight)
