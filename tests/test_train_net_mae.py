"""MAE pretraining through train_net.py: an epoch of a folder with a corrupt file, pictures,
checkpoints that a detection backbone loads whole, --resume, and the picture tool on the result."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script, mae_shrink_overrides
from PIL import Image
from train_net_runs import (
    MAE_CONFIG,
    assert_same_losses,
    read_losses,
    run,
    run_killed_then_resumed,
)

from hiera_det.checkpoint import load_hiera_checkpoint
from hiera_det.mae.pictures import GAP, HEADER
from hiera_det.modeling import build_hiera

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

SHRINK = mae_shrink_overrides()
TINY_STAGES = "model.encoder.stages=[1,1,2,1]"


def load_train_net():
    return load_script("train_net.py", "train_net")


def run_train_net(config, opts, resume=False):
    train_net = load_train_net()
    argv = ["--config-file", str(ROOT / config)] + (["--resume"] if resume else []) + opts
    args = train_net.default_argument_parser().parse_args(argv)
    train_net.main(args)


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if "total_loss" in line]


def test_train_net_pretrains_then_the_detector_backbone_loads_every_weight(
    mae_images, tmp_path, caplog
):
    out = tmp_path / "run"
    opts = SHRINK + [
        TINY_STAGES,
        f"dataloader.train.root={mae_images}",
        f"train.output_dir={out}",
        "train.device=cpu",
        "train.log_period=1",
        "train.checkpointer.period=2",
        "train.extra_hooks.0.period=2",
        "train.extra_hooks.0.num_images=2",
    ]
    with caplog.at_level(logging.WARNING, logger="hiera_det.data.images"):
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
    skipped = [r.getMessage() for r in caplog.records if "Skipped image" in r.getMessage()]
    assert skipped and all("corrupt.jpg" in m for m in skipped)
    assert f"({len(skipped)} images skipped so far" in skipped[-1]

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
            str(mae_images),
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


@pytest.fixture(scope="module")
def mae_resume_images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mae_resume_images")
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "broken.jpg").write_bytes(b"not an image")  # skipped, and the run still resumes
    return root


def test_mae_resume_after_kill_matches_uninterrupted(mae_resume_images, tmp_path):
    opts = [
        "model.encoder.embed_dim=16",
        "model.encoder.num_heads=1",
        "model.encoder.stages=[1,1,2,1]",
        "model.encoder.pretrain_img_size=64",
        "model.encoder.drop_path_rate=0.1",
        "model.decoder_embed_dim=32",
        "model.decoder_depth=1",
        "model.decoder_num_heads=2",
        f"dataloader.train.root={mae_resume_images}",
        "dataloader.train.img_size=64",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "train.max_iter=6",
        "train.checkpointer.period=2",
        "train.log_period=1",
        "train.seed=5",
        "train.device=cpu",
    ]
    run(MAE_CONFIG, tmp_path / "full", opts)
    log = (tmp_path / "full" / "log.txt").read_text()
    assert "Skipped image" in log and "broken.jpg" in log
    reference = read_losses(tmp_path / "full")
    assert sorted(reference) == list(range(6))
    start = run_killed_then_resumed(
        MAE_CONFIG, tmp_path / "killed", opts, kill_after="model_0000003.pth"
    )
    assert_same_losses(read_losses(tmp_path / "killed"), reference, start, 5)
