"""The detection layout of the Hiera backbone against independent references.

* Windows (zero-padded at the border), global blocks and SAM 2's position embedding
  (``pos_embed_type="sam2"``): timm's `HieraDet` (`timm.models.hieradet_sam2`, the SAM 2 trunk;
  SPEC.md section 5 gives the mapping: windows of (8, 4, 14, 7) tokens = (1, 1, 7, 7) mask units,
  no attention mask). `tests/test_sam2.py` does the same through the SAM 2 configs and files.
* The "abs_win" table on its own: timm's `Hiera` with ``abs_win_pos_embed=True`` (which resizes the
  background table with antialias, as ours does by default).
* The official "abs" table resized to the input: Detectron2's ViT `get_abs_pos` and timm's
  `resample_abs_pos_embed` (bicubic, no antialias).

Inputs are 1024 px squares (the detection recipe) and non-square sizes whose unit grids do not
divide into whole windows, so that the padding is exercised in both directions.
"""

from __future__ import annotations

import pytest
import torch
from detectron2.modeling.backbone.utils import get_abs_pos
from timm.layers import resample_abs_pos_embed
from timm.models.hiera import Hiera as TimmHiera
from timm.models.hieradet_sam2 import HieraDet

from hiera_det.modeling import Hiera

pytestmark = pytest.mark.usefixtures("single_thread")

# Shrunk SAM 2 layout: stage 3 has global blocks 3 and 5, stage 4 is windowed (7 units).
SMALL = dict(embed_dim=16, num_heads=1, stages=(1, 1, 4, 2))
SMALL_GLOBAL = (3, 5)
# The block layout of SAM 2's Hiera-T (timm's sam2_hiera_tiny), at width 8 instead of 96: the
# real width takes about a minute at 1024 px on this machine's CPUs (2026-12-01: 57 s, 1 thread).
TINY = dict(embed_dim=8, num_heads=1, stages=(1, 2, 7, 2))
TINY_GLOBAL = (5, 7, 9)


def sam2_pair(arch: dict, global_blocks: tuple[int, ...]) -> tuple[HieraDet, Hiera]:
    """(timm HieraDet, ours) with the same random weights."""
    torch.manual_seed(0)
    ref = HieraDet(
        num_classes=0, window_spec=(8, 4, 14, 7), global_att_blocks=global_blocks,
        global_pos_size=(7, 7), **arch,
    ).eval()  # fmt: skip
    ours = Hiera(
        pos_embed_type="sam2", pos_embed_global_size=(7, 7), stage_windows=(1, 1, 7, 7),
        global_blocks=global_blocks, **arch,
    ).eval()  # fmt: skip
    state = {k.replace("pos_embed_window", "pos_embed_win"): v for k, v in ref.state_dict().items()}
    extra = {k for k in state if k not in ours.state_dict()}
    assert extra <= {"head.norm.weight", "head.norm.bias"}  # timm's classifier norm
    ours.load_state_dict({k: v for k, v in state.items() if k in ours.state_dict()}, strict=True)
    return ref, ours


def assert_stages_match(ours: Hiera, ref: HieraDet, x: torch.Tensor, atol: float) -> None:
    with torch.no_grad():
        expected = ref.forward_intermediates(x, intermediates_only=True)
        got = ours(x)
    assert list(got) == ["res2", "res3", "res4", "res5"]
    for (name, y), y_ref in zip(got.items(), expected):
        assert y.shape == y_ref.shape, name
        err = (y - y_ref).abs().max().item()
        assert err <= atol, f"{name}: max |ours - timm HieraDet| = {err:.2e} > {atol:.0e}"


@pytest.mark.parametrize("hw", [(416, 288), (288, 480)])
def test_windows_and_global_blocks_match_sam2_hieradet(hw):
    """13x9 / 9x15 mask units: stage-3 windows of 14 tokens and stage-4 windows of 7 tokens do not
    tile the grid, so both directions are zero-padded. Measured agreement: about 4e-7."""
    ref, ours = sam2_pair(SMALL, SMALL_GLOBAL)
    assert_stages_match(ours, ref, torch.randn(1, 3, *hw), atol=1e-5)


def test_tiny_layout_at_1024_matches_sam2_hieradet():
    """SAM 2 Hiera-T's blocks, windows and global blocks at the detection resolution (32x32 units;
    7-unit windows pad to 35)."""
    ref, ours = sam2_pair(TINY, TINY_GLOBAL)
    torch.manual_seed(1)
    assert_stages_match(ours, ref, torch.randn(1, 3, 1024, 1024), atol=1e-4)


@pytest.mark.parametrize("grid", [(256, 256), (192, 256)])
def test_abs_win_table_matches_sam2_without_patching(grid):
    """``pos_embed_type="sam2"`` resizes the background without antialias, as SAM 2 does; timm's
    Hiera's way ("abs_win", with antialias) differs from it, so the option is what matters."""
    ref, ours = sam2_pair(SMALL, SMALL_GLOBAL)
    with torch.no_grad():
        expected = ref._pos_embed(torch.zeros(1, *grid, SMALL["embed_dim"]))
        torch.testing.assert_close(ours.get_pos_embed(grid), expected, atol=1e-6, rtol=0)
        ours.pos_embed_type = "abs_win"
        assert (ours.get_pos_embed(grid) - expected).abs().max() > 1e-4


@pytest.mark.parametrize("img_size", [(1024, 1024), (768, 1024), (1024, 640)])
def test_abs_win_table_matches_timm_hiera(img_size):
    """Our "abs_win" embedding (7x7 background resized with antialias + 8x8 window table tiled)
    equals timm's Hiera ``abs_win_pos_embed`` for the same tables."""
    torch.manual_seed(0)
    ref = TimmHiera(
        img_size=img_size, abs_win_pos_embed=True, global_pos_size=(7, 7), num_classes=0, **SMALL
    )
    ours = Hiera(pos_embed_type="abs_win", pos_embed_global_size=(7, 7), **SMALL)
    with torch.no_grad():
        ours.pos_embed.copy_(ref.pos_embed)
        ours.pos_embed_win.copy_(ref.pos_embed_win)
        grid = (img_size[0] // 4, img_size[1] // 4)
        tokens = torch.zeros(1, grid[0] * grid[1], SMALL["embed_dim"])
        expected = ref._pos_embed(tokens).reshape(1, *grid, SMALL["embed_dim"])
        torch.testing.assert_close(ours.get_pos_embed(grid), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("img_size", [(1024, 1024), (768, 1024), (1024, 640)])
def test_official_table_resize_matches_detectron2_vit_and_timm(img_size):
    """The official 56x56 table (224 px) resized to the token grid of `img_size`."""
    torch.manual_seed(0)
    ours = Hiera(**SMALL)  # pos_embed_type="abs", pretrain_img_size=224
    grid = (img_size[0] // 4, img_size[1] // 4)
    with torch.no_grad():
        got = ours.get_pos_embed(grid)
        vitdet = get_abs_pos(ours.pos_embed, has_cls_token=False, hw=grid)
        timm_resized = resample_abs_pos_embed(
            ours.pos_embed, list(grid), num_prefix_tokens=0, antialias=False
        ).reshape(1, *grid, -1)
    assert got.shape == (1, *grid, SMALL["embed_dim"])
    torch.testing.assert_close(got, vitdet, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, timm_resized, atol=1e-6, rtol=0)
