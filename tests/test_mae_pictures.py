"""Pictures of MAE reconstructions (hiera_det.mae.pictures) and tools/mae_pictures.py."""

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script

from hiera_det.checkpoint import HieraCheckpointer
from hiera_det.mae.model import build_mae
from hiera_det.mae.pictures import GAP, HEADER, render_reconstructions

pytestmark = pytest.mark.usefixtures("single_thread")


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


def test_picture_tool_rejects_an_unknown_config_key(mae_images, tmp_path):
    from hiera_det.config_check import ConfigOverrideError

    tool = load_script("tools/mae_pictures.py", "mae_pictures")
    args = ["--config-file", str(ROOT / "configs/mae/mae_hiera_t.py"), "--checkpoint", "x.pth"]
    args += [
        "--input",
        str(mae_images),
        "--output",
        str(tmp_path / "p.png"),
        "model.mask_ratoi=0.5",
    ]
    with pytest.raises(ConfigOverrideError, match="mask_ratoi"):
        tool.main(args)


def test_official_mae_checkpoint_loads_for_pictures(tmp_path, official_mae):
    torch.manual_seed(0)
    ref = official_mae.MaskedAutoencoderHiera(
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
