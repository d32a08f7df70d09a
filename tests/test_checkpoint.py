"""Checkpoint conversion and loading (hiera_det.checkpoint)."""

import pytest
import timm
import torch
from torch import nn

from hiera_det.checkpoint import (
    CheckpointMismatchError,
    HieraCheckpointer,
    convert_hiera_checkpoint,
    load_hiera_checkpoint,
)
from hiera_det.modeling import Hiera, build_hiera

try:
    import hiera  # the official hiera-transformer package: the reference, not a dependency
except ImportError:
    hiera = None
needs_official = pytest.mark.skipif(
    hiera is None, reason="compares with the official model: pip install hiera-transformer"
)


@pytest.fixture(scope="module")
def official_tiny():
    torch.manual_seed(0)
    return hiera.hiera_tiny_224(pretrained=False).eval()


def features(model, x):
    with torch.no_grad():
        return model.eval()(x)


def assert_features_match_official(ours, official, x):
    _, expected = official(x, return_intermediates=True)
    got = features(ours, x)
    for y, y_ref in zip(got.values(), expected):
        torch.testing.assert_close(y, y_ref.permute(0, 3, 1, 2), atol=1e-4, rtol=1e-4)


@needs_official
def test_official_checkpoint_converts_and_loads_with_nothing_missing(official_tiny):
    checkpoint = {"model_state": official_tiny.state_dict()}
    state = convert_hiera_checkpoint(checkpoint)
    assert not any(k.startswith(("head.", "norm.")) for k in state)
    model = build_hiera("tiny")
    report = load_hiera_checkpoint(model, checkpoint)
    assert report.missing == [] and report.unexpected == [] and report.resized == []
    assert set(report.dropped) == {k for k in official_tiny.state_dict() if k not in state}
    assert_features_match_official(model, official_tiny, torch.randn(1, 3, 224, 224))


@needs_official
def test_official_mae_checkpoint_loads_encoder_and_drops_decoder():
    torch.manual_seed(0)
    mae = hiera.mae_hiera_tiny_224(pretrained=False)
    model = build_hiera("tiny")
    report = load_hiera_checkpoint(model, {"model_state": mae.state_dict()})
    assert report.missing == []
    assert any(k.startswith("decoder_blocks.") for k in report.dropped)
    assert "mask_token" in report.dropped
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, mae.state_dict()[key])


def test_timm_checkpoint_matches_timm_features():
    torch.manual_seed(0)
    ref = timm.create_model("hiera_tiny_224", pretrained=False).eval()
    model = build_hiera("tiny")
    report = load_hiera_checkpoint(model, ref.state_dict())
    assert report.missing == [] and any(k.startswith("head.") for k in report.dropped)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, intermediates_only=True)
    for y, y_ref in zip(features(model, x).values(), expected):
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


def test_timm_abs_win_position_embedding_matches_timm_features():
    torch.manual_seed(0)
    # The paper's Hiera-S with timm's "abs_win" position embedding (a 16x16 global table plus an
    # 8x8 mask-unit table). timm's own *_abswin_* models add layer scale and are not Hiera-S.
    ref = timm.create_model(
        "hiera_small_224", img_size=256, abs_win_pos_embed=True, global_pos_size=(16, 16)
    ).eval()
    model = build_hiera("small", pos_embed_type="abs_win", pos_embed_global_size=(16, 16))
    report = load_hiera_checkpoint(model, ref.state_dict())
    assert report.missing == [] and report.resized == []
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, intermediates_only=True)
    for y, y_ref in zip(features(model, x).values(), expected):
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prefix", ["encoder.", "backbone.bottom_up.", "module.backbone.net."])
def test_detectron2_style_files_with_prefixes_round_trip(prefix, tmp_path):
    torch.manual_seed(1)
    source = Hiera(embed_dim=16, stages=(1, 1, 2, 1))
    extra = {"decoder_pred.weight": torch.zeros(3), "roi_heads.box.weight": torch.zeros(2)}
    content = {"model": {prefix + k: v for k, v in source.state_dict().items()} | extra}
    path = tmp_path / "model_final.pth"
    torch.save({**content, "iteration": 7}, path)
    target = Hiera(embed_dim=16, stages=(1, 1, 2, 1))
    report = load_hiera_checkpoint(target, str(path))
    assert report.missing == [] and sorted(report.dropped) == sorted(extra)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


def test_position_table_is_resized_and_reported():
    source = Hiera(embed_dim=16, stages=(1, 1, 2, 1))  # 56x56 table
    target = Hiera(embed_dim=16, stages=(1, 1, 2, 1), pretrain_img_size=256)  # 64x64 table
    report = load_hiera_checkpoint(target, source.state_dict())
    assert report.resized == ["pos_embed: (1, 3136, 16) -> (1, 4096, 16)"]
    assert "resized" in str(report)
    abs_win = Hiera(embed_dim=16, stages=(1, 1, 2, 1), pos_embed_type="abs_win")
    report = load_hiera_checkpoint(abs_win, source.state_dict())
    assert report.resized == ["pos_embed: (1, 3136, 16) -> (1, 16, 14, 14)"]
    assert report.missing == ["pos_embed_win"] and "MISSING" in str(report)


@needs_official
def test_checkpoint_of_another_size_is_rejected_naming_tensors(official_tiny):
    model = build_hiera("small")
    with pytest.raises(CheckpointMismatchError) as err:
        load_hiera_checkpoint(model, {"model_state": official_tiny.state_dict()})
    message = str(err.value)
    assert "Hiera-tiny" in message and "Hiera-small" in message
    assert "blocks.10.attn.qkv.weight" in message


def test_file_without_hiera_weights_is_rejected():
    with pytest.raises(KeyError, match="no Hiera weights"):
        convert_hiera_checkpoint({"model": {"conv1.weight": torch.zeros(1)}})
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_hiera_checkpoint(Hiera(embed_dim=16, stages=(1, 1, 2, 1)), "/nowhere.pth")


class Detector(nn.Module):
    """Stands in for GeneralizedRCNN: a Hiera nested as backbone.bottom_up, plus a head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.bottom_up = Hiera(embed_dim=16, stages=(1, 1, 2, 1))
        self.head = nn.Linear(4, 2)


def test_hiera_checkpointer_loads_pretrained_into_the_nested_backbone(tmp_path):
    torch.manual_seed(2)
    pretrained = Hiera(embed_dim=16, stages=(1, 1, 2, 1))
    path = tmp_path / "mae.pth"
    torch.save({"model_state": pretrained.state_dict()}, path)
    detector = Detector()
    head_before = detector.head.weight.clone()
    HieraCheckpointer(detector).load(str(path))
    for key, value in pretrained.state_dict().items():
        torch.testing.assert_close(detector.backbone.bottom_up.state_dict()[key], value)
    torch.testing.assert_close(detector.head.weight, head_before)

    # A checkpoint of the detector itself loads through Detectron2's own path (resume).
    saver = HieraCheckpointer(detector, save_dir=str(tmp_path))
    saver.save("model_0000009", iteration=9)
    fresh = Detector()
    extra = HieraCheckpointer(fresh).load(str(tmp_path / "model_0000009.pth"))
    assert extra["iteration"] == 9
    torch.testing.assert_close(fresh.head.weight, detector.head.weight)

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        HieraCheckpointer(fresh).load(str(tmp_path / "missing.pth"))


def test_saving_is_atomic_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    detector = Detector()
    saver = HieraCheckpointer(detector, save_dir=str(tmp_path))
    saver.save("model_final", iteration=1)
    before = (tmp_path / "model_final.pth").read_bytes()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"

    def killed_mid_write(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt  # what a kill during torch.save looks like to Python

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with torch.no_grad():
        detector.head.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        saver.save("model_final", iteration=2)
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]


@needs_official
@pytest.mark.parametrize("wrap", [False, True])
def test_official_mae_file_continues_pretraining_in_our_mae(wrap, tmp_path):
    from hiera_det.checkpoint import convert_mae_checkpoint
    from hiera_det.mae.model import build_mae

    torch.manual_seed(3)
    official = hiera.mae_hiera_tiny_224(pretrained=False).state_dict()
    path = tmp_path / "mae_hiera_tiny_224.pth"
    torch.save({"model_state": official} if wrap else official, path)
    ours = build_mae("tiny")
    HieraCheckpointer(ours).load(str(path))
    expected = convert_mae_checkpoint(official)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_strict_checkpointer_rejects_a_file_that_leaves_tensors_unloaded(tmp_path):
    from hiera_det.mae.model import build_mae

    torch.manual_seed(4)
    backbone_only = tmp_path / "backbone.pth"
    torch.save(hiera.mae_hiera_tiny_224(pretrained=False).state_dict(), tmp_path / "mae.pth")
    torch.save({"model": Hiera(stages=(1, 2, 7, 2)).state_dict()}, backbone_only)
    ours = build_mae("tiny")
    HieraCheckpointer(ours, strict=True).load(str(tmp_path / "mae.pth"))  # fits exactly
    HieraCheckpointer(ours).load(str(backbone_only))  # not strict: loads what fits
    with pytest.raises(
        CheckpointMismatchError, match=r"backbone.pth does not fill.*missing .*decoder"
    ):
        HieraCheckpointer(ours, strict=True).load(str(backbone_only))
