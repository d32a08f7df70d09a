"""SAM 2 and timm abswin weights in the backbone of our configs, against timm as the reference.

timm's `sam2_hiera_*` is SAM 2's image-encoder trunk ("HieraDet"); its random weights are written
to a file the way Meta publishes SAM 2 / SAM 2.1 checkpoints (``{"model": ...}``, the trunk under
``image_encoder.trunk.``, the MLP as ``mlp.layers.0/1``, other SAM 2 parts beside it) and loaded
through `load_hiera_checkpoint` into the backbone that `configs/sam2/mask_rcnn_hiera_<size>.py`
builds. Widths are shrunk (and depths, where said) to keep the tests fast on CPU; the windows,
global blocks and position embedding are those of the config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from detectron2.config import LazyConfig, instantiate

from hiera_det.checkpoint import CheckpointMismatchError, HieraCheckpointer, load_hiera_checkpoint
from hiera_det.modeling import SAM2_HIERA_SIZES, Hiera, build_hiera

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sam2"
SUFFIXES = {"tiny": "t", "small": "s", "base_plus": "b_plus", "large": "l"}
# Parts of a SAM 2 file that are not the trunk (one tensor each stands for the many there are).
SAM2_OTHERS = (
    "image_encoder.neck.convs.0.conv.weight",
    "memory_attention.layers.0.self_attn.q_proj.weight",
    "sam_mask_decoder.iou_token.weight",
    "maskmem_tpos_enc",
)


def sam2_file_content(timm_state: dict[str, torch.Tensor]) -> dict:
    """A timm `sam2_hiera_*` state dict in the layout of Meta's SAM 2 checkpoint files."""
    trunk = {
        "image_encoder.trunk."
        + k.replace("mlp.fc1.", "mlp.layers.0.").replace("mlp.fc2.", "mlp.layers.1."): v
        for k, v in timm_state.items()
        if not k.startswith("head.")  # timm's classifier norm; SAM 2 has no head
    }
    return {"model": {**trunk, **{k: torch.zeros(2) for k in SAM2_OTHERS}}}


def config_backbone(size: str, overrides: list[str]) -> Hiera:
    cfg = LazyConfig.load(str(CONFIGS / f"mask_rcnn_hiera_{SUFFIXES[size]}.py"))
    cfg = LazyConfig.apply_overrides(cfg, [f"model.backbone.bottom_up.{o}" for o in overrides])
    return instantiate(cfg.model.backbone.bottom_up).eval()


def assert_stages_match(ours: Hiera, ref, x: torch.Tensor, atol: float = 1e-4) -> None:
    with torch.no_grad():
        expected = ref.forward_intermediates(x, intermediates_only=True)
        got = ours(x)
    assert list(got) == ["res2", "res3", "res4", "res5"]
    for (name, y), y_ref in zip(got.items(), expected):
        assert y.shape == y_ref.shape, name
        err = (y - y_ref).abs().max().item()
        assert err <= atol, f"{name}: max |ours - timm| = {err:.2e} > {atol:.0e}"


def load_sam2_pair(size: str, tmp_path, **arch) -> tuple[torch.nn.Module, Hiera]:
    """(timm sam2_hiera_<size>, the config's backbone loaded from a SAM 2 format file), with the
    architecture arguments `arch` (embed_dim, stages, global blocks) applied to both."""
    torch.manual_seed(0)
    timm_arch = {k: v for k, v in arch.items() if k != "global_blocks"}
    if "global_blocks" in arch:
        timm_arch["global_att_blocks"] = tuple(arch["global_blocks"])
    ref = timm.create_model(f"sam2_hiera_{size}", pretrained=False, **timm_arch).eval()
    path = tmp_path / f"sam2.1_hiera_{size}.pt"
    torch.save(sam2_file_content(ref.state_dict()), path)
    overrides = [f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in arch.items()]
    ours = config_backbone(size, overrides)
    report = load_hiera_checkpoint(ours, str(path))
    assert report.missing == [] and report.unexpected == [] and report.resized == []
    assert sorted(report.dropped) == sorted(SAM2_OTHERS)
    return ref, ours


@pytest.mark.parametrize("size", SUFFIXES)
def test_config_backbone_is_sam2_trunk_at_a_non_square_size(size, tmp_path):
    """The config's whole layout (width shrunk to 16): 15x11 mask units, so that stage 3/4
    windows of 7 (L: 8) units are zero-padded in both directions."""
    ref, ours = load_sam2_pair(size, tmp_path, embed_dim=16)
    torch.manual_seed(1)
    assert_stages_match(ours, ref, torch.randn(1, 3, 480, 352))


# At 1024 px: T with its whole layout (depth, windows, global blocks); the deeper sizes with their
# windows and position tables but one block per stage plus a global one in stage 3. All at width
# 8: the full-width T takes about 2 minutes here (passed 2026-12-01, 112 s on the shared CPUs).
SHALLOW = dict(stages=(1, 1, 2, 1), global_blocks=(3,))
AT_1024 = {"tiny": {}, "small": SHALLOW, "base_plus": SHALLOW, "large": SHALLOW}


@pytest.mark.parametrize("size", AT_1024)
def test_config_backbone_is_sam2_trunk_at_1024(size, tmp_path):
    """1024x1024: 32x32 mask units, so windows of 7 units pad to 35 and windows of 8 tile."""
    ref, ours = load_sam2_pair(size, tmp_path, embed_dim=8, **AT_1024[size])
    torch.manual_seed(1)
    assert_stages_match(ours, ref, torch.randn(1, 3, 1024, 1024))


def test_timm_sam2_state_dict_and_checkpointer(tmp_path):
    """timm's own names load as well, and `HieraCheckpointer` (train.init_checkpoint) places a
    SAM 2 file under the detector's backbone with nothing of the trunk missing."""
    torch.manual_seed(0)
    ref = timm.create_model("sam2_hiera_tiny", pretrained=False, embed_dim=16).eval()
    ours = config_backbone("tiny", ["embed_dim=16"])
    report = load_hiera_checkpoint(ours, ref.state_dict())
    assert report.missing == [] and report.dropped == ["head.norm.weight", "head.norm.bias"]
    assert_stages_match(ours, ref, torch.randn(1, 3, 288, 416))

    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save(sam2_file_content(ref.state_dict()), path)
    detector = torch.nn.Module()
    detector.backbone = torch.nn.Module()
    detector.backbone.bottom_up = config_backbone("tiny", ["embed_dim=16"])
    HieraCheckpointer(detector).load(str(path))
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(detector.backbone.bottom_up.state_dict()[key], value)


def test_sam2_file_of_another_size_names_both_sizes(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("sam2_hiera_small", pretrained=False, embed_dim=16)
    ours = config_backbone("tiny", ["embed_dim=32"])
    with pytest.raises(CheckpointMismatchError) as err:
        load_hiera_checkpoint(ours, sam2_file_content(ref.state_dict()))
    message = str(err.value)
    assert "stages=(1, 2, 11, 2)" in message and "stages=(1, 2, 7, 2)" in message
    real_small = sam2_file_content(
        timm.create_model("sam2_hiera_small", pretrained=False, embed_dim=96).state_dict()
    )
    with pytest.raises(CheckpointMismatchError, match="Hiera-small .* the model is Hiera-tiny"):
        load_hiera_checkpoint(config_backbone("tiny", []), real_small)


def test_sam2_layouts_match_timm_constructors():
    """The table's layouts are those of timm's `sam2_hiera_*` constructors (SAM 2's yaml files):
    windows in mask units times tokens per unit at each stage = timm's window_spec."""
    for size, spec in SAM2_HIERA_SIZES.items():
        ref = timm.create_model(f"sam2_hiera_{size}", pretrained=False, embed_dim=8)
        tokens_per_unit = (8, 4, 2, 1)
        assert tuple(w * t for w, t in zip(spec["stage_windows"], tokens_per_unit)) == tuple(
            ref.window_spec
        ), size
        assert tuple(spec["global_blocks"]) == tuple(ref.global_att_blocks), size
        assert tuple(spec["pos_embed_global_size"]) == tuple(ref.global_pos_size), size
        assert tuple(spec["stages"]) == tuple(
            ref.stage_ends[i] - ref.stage_ends[i - 1] if i else ref.stage_ends[0] + 1
            for i in range(4)
        ), size


def randomize_layer_scale(model: torch.nn.Module) -> None:
    """timm initialises LayerScale to 1e-5, which would hide any error in the branches."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.normal_(1.0, 0.5)


@pytest.mark.parametrize(
    ("img", "arch"), [(256, {}), (1024, dict(embed_dim=16, stages=(1, 1, 2, 1)))]
)
def test_timm_abswin_small_matches(img, arch):
    """timm's hiera_small_abswin_256 (LayerScale, transition without proj, 16x16 global table)
    at 256 px (the real model) and at 1024 px (width 16, one block per stage except stage 3)."""
    torch.manual_seed(0)
    ref = timm.create_model("hiera_small_abswin_256", pretrained=False, img_size=img, **arch)
    ref.eval()
    randomize_layer_scale(ref)
    ours = build_hiera("small", layout="timm_abswin", **arch).eval()
    report = load_hiera_checkpoint(ours, ref.state_dict())
    assert report.missing == [] and report.unexpected == [] and report.resized == []
    assert all(k.startswith("head.") for k in report.dropped)
    torch.manual_seed(1)
    assert_stages_match(ours, ref, torch.randn(1, 3, img, img))


def test_abswin_override_of_the_small_config_loads_timm_weights():
    """README's way to start from timm's abswin weights: the paper's Hiera-S config with
    ``layout=timm_abswin`` (its detection windows kept) takes the whole timm state dict."""
    cfg = LazyConfig.load(str(CONFIGS.parent / "mask_rcnn_hiera_s.py"))
    overrides = ["layout=timm_abswin", "embed_dim=16"]
    cfg = LazyConfig.apply_overrides(cfg, [f"model.backbone.bottom_up.{o}" for o in overrides])
    ours = instantiate(cfg.model.backbone.bottom_up)
    ref = timm.create_model("hiera_small_abswin_256", pretrained=False, embed_dim=16)
    report = load_hiera_checkpoint(ours, ref.state_dict())
    assert report.missing == [] and report.unexpected == [] and report.resized == []
