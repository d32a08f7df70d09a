"""Checkpoints (hiera_det.checkpoint): every format converted and loaded into the backbone, the
checkpointer, and checkpoints as data, not code.

- Official, timm and our MAE/detector files load with nothing missing, against the official model
  and timm's features.
- SAM 2 and timm abswin weights load into the backbone of our configs, against timm as the
  reference: timm's `sam2_hiera_*` is SAM 2's image-encoder trunk ("HieraDet"); its random weights
  are written to a file the way Meta publishes SAM 2 / SAM 2.1 checkpoints (``{"model": ...}``,
  the trunk under ``image_encoder.trunk.``, the MLP as ``mlp.layers.0/1``, other SAM 2 parts
  beside it) and loaded into the backbone that `configs/sam2/mask_rcnn_hiera_<size>.py` builds.
  Widths are shrunk (and depths, where said) to keep the tests fast on CPU; the windows, global
  blocks and position embedding are those of the config.
- A checkpoint whose pickle would run code (here: create a file) is refused on every path that
  reads one, naming the file; the opt-in loads a file one trusts.
"""

import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import ROOT, assert_refused, assert_stages_match, load_script, shrink_overrides
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser
from torch import nn

from hiera_det.checkpoint import (
    TRUST_ENV,
    CheckpointMismatchError,
    HieraCheckpointer,
    convert_hiera_checkpoint,
    load_hiera_checkpoint,
)
from hiera_det.modeling import SAM2_HIERA_SIZES, Hiera, build_hiera

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def official_tiny(official_hiera):
    torch.manual_seed(0)
    return official_hiera.hiera_tiny_224(pretrained=False).eval()


def features(model, x):
    with torch.no_grad():
        return model.eval()(x)


def assert_features_match_official(ours, official, x):
    _, expected = official(x, return_intermediates=True)
    got = features(ours, x)
    for y, y_ref in zip(got.values(), expected):
        torch.testing.assert_close(y, y_ref.permute(0, 3, 1, 2), atol=1e-4, rtol=1e-4)


def test_official_checkpoint_converts_and_loads_with_nothing_missing(official_tiny):
    checkpoint = {"model_state": official_tiny.state_dict()}
    state = convert_hiera_checkpoint(checkpoint)
    assert not any(k.startswith(("head.", "norm.")) for k in state)
    model = build_hiera("tiny")
    report = load_hiera_checkpoint(model, checkpoint)
    assert report.missing == [] and report.unexpected == [] and report.resized == []
    assert set(report.dropped) == {k for k in official_tiny.state_dict() if k not in state}
    assert_features_match_official(model, official_tiny, torch.randn(1, 3, 224, 224))


def test_official_mae_checkpoint_loads_encoder_and_drops_decoder(official_hiera):
    torch.manual_seed(0)
    mae = official_hiera.mae_hiera_tiny_224(pretrained=False)
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


@pytest.mark.parametrize("wrap", [False, True])
def test_official_mae_file_continues_pretraining_in_our_mae(wrap, tmp_path, official_hiera):
    from hiera_det.checkpoint import convert_mae_checkpoint
    from hiera_det.mae.model import build_mae

    torch.manual_seed(3)
    official = official_hiera.mae_hiera_tiny_224(pretrained=False).state_dict()
    path = tmp_path / "mae_hiera_tiny_224.pth"
    torch.save({"model_state": official} if wrap else official, path)
    ours = build_mae("tiny")
    HieraCheckpointer(ours).load(str(path))
    expected = convert_mae_checkpoint(official)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_strict_checkpointer_rejects_a_file_that_leaves_tensors_unloaded(tmp_path, official_hiera):
    from hiera_det.mae.model import build_mae

    torch.manual_seed(4)
    backbone_only = tmp_path / "backbone.pth"
    torch.save(
        official_hiera.mae_hiera_tiny_224(pretrained=False).state_dict(), tmp_path / "mae.pth"
    )
    torch.save({"model": Hiera(stages=(1, 2, 7, 2)).state_dict()}, backbone_only)
    ours = build_mae("tiny")
    HieraCheckpointer(ours, strict=True).load(str(tmp_path / "mae.pth"))  # fits exactly
    HieraCheckpointer(ours).load(str(backbone_only))  # not strict: loads what fits
    with pytest.raises(
        CheckpointMismatchError, match=r"backbone.pth does not fill.*missing .*decoder"
    ):
        HieraCheckpointer(ours, strict=True).load(str(backbone_only))


def tiny_hiera() -> Hiera:
    return Hiera(embed_dim=16, stages=(1, 1, 2, 1))


def test_the_payload_runs_code_under_plain_pickle(evil):
    pth, pkl, flag = evil
    with open(pkl, "rb") as f:
        pickle.load(f)
    assert flag.exists()  # so the tests below would see it if a path unpickled it


def test_load_hiera_checkpoint_and_checkpointer_refuse_code(evil):
    pth, pkl, flag = evil
    assert_refused(lambda: load_hiera_checkpoint(tiny_hiera(), str(pth)), pth, flag)
    assert_refused(lambda: HieraCheckpointer(tiny_hiera()).load(str(pth)), pth, flag)
    assert_refused(lambda: HieraCheckpointer(tiny_hiera()).load(str(pkl)), pkl, flag)


def test_trusted_file_loads_with_full_pickle(evil, monkeypatch):
    pth, pkl, flag = evil
    monkeypatch.setenv(TRUST_ENV, f"/elsewhere.pth:{pth}")
    load_hiera_checkpoint(tiny_hiera(), str(pth))
    assert flag.exists()
    flag.unlink()
    assert_refused(lambda: HieraCheckpointer(tiny_hiera()).load(str(pkl)), pkl, flag)


class ZooModel(nn.Module):
    """A model whose weights a model-zoo .pkl holds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)


def test_model_zoo_pkl_of_numpy_arrays_loads(tmp_path):
    torch.manual_seed(0)
    source = ZooModel()
    for author, protocol in (("Detectron2 zoo", 2), ("Detectron2 zoo", 4), (None, 2)):
        data = {k: v.numpy() for k, v in source.state_dict().items()}
        data = {"model": data, "__author__": author} if author else {"blobs": data}
        path = tmp_path / f"zoo_{protocol}_{bool(author)}.pkl"
        path.write_bytes(pickle.dumps(data, protocol))
        fresh = ZooModel()
        HieraCheckpointer(fresh).load(str(path))
        for key, value in source.state_dict().items():
            torch.testing.assert_close(fresh.state_dict()[key], value)
    # numpy scalars and an OrderedDict are data too
    path = tmp_path / "scalars.pkl"
    path.write_bytes(pickle.dumps({"model": {}, "__author__": "x", "lr": np.float32(0.1)}, 2))
    assert HieraCheckpointer(ZooModel()).load(str(path))["lr"] == np.float32(0.1)


def train_net_args(tiny_coco, out: Path, *extra: str):
    data = f"{tiny_coco.json_file},{tiny_coco.image_root}"
    return default_argument_parser().parse_args(
        [
            *extra[:1],
            "--config-file",
            str(ROOT / "configs/mask_rcnn_hiera_t.py"),
            *shrink_overrides(128),
            f"dataset.train=[tiny_safe,{data}]",
            f"dataset.test=[tiny_safe,{data}]",
            f"train.output_dir={out}",
            "train.max_iter=1",
            *extra[1:],
        ]
    )


def test_train_net_eval_only_and_resume_refuse_code(evil, tiny_coco, tmp_path):
    pth, _, flag = evil
    init = f"train.init_checkpoint={pth}"
    args = train_net_args(tiny_coco, tmp_path / "eval", "--eval-only", init)
    train_net = load_script("train_net.py", "train_net")
    assert_refused(lambda: train_net.main(args), pth, flag)

    out = tmp_path / "resume"
    out.mkdir()
    planted = out / "model_0000009.pth"
    planted.write_bytes(pth.read_bytes())
    (out / "last_checkpoint").write_text(planted.name)
    args = train_net_args(tiny_coco, out, "--resume")
    assert_refused(lambda: train_net.main(args), planted, flag)


def test_mae_picture_tool_refuses_code(evil, tmp_path):
    pth, _, flag = evil
    tool = load_script("tools/mae_pictures.py", "mae_pictures")
    args = ["--config-file", str(ROOT / "configs/mae/mae_hiera_t.py"), "--checkpoint", str(pth)]
    args += ["--input", str(tmp_path), "--output", str(tmp_path / "p.png"), "--device", "cpu"]
    assert_refused(lambda: tool.main(args), pth, flag)


SAM2_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sam2"


SAM2_SUFFIXES = {"tiny": "t", "small": "s", "base_plus": "b_plus", "large": "l"}


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
    cfg = LazyConfig.load(str(SAM2_CONFIGS / f"mask_rcnn_hiera_{SAM2_SUFFIXES[size]}.py"))
    cfg = LazyConfig.apply_overrides(cfg, [f"model.backbone.bottom_up.{o}" for o in overrides])
    return instantiate(cfg.model.backbone.bottom_up).eval()


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


@pytest.mark.parametrize("size", SAM2_SUFFIXES)
def test_config_backbone_is_sam2_trunk_at_a_non_square_size(size, tmp_path):
    """The config's whole layout (width shrunk to 16): 15x11 mask units, so that stage 3/4
    windows of 7 (L: 8) units are zero-padded in both directions."""
    ref, ours = load_sam2_pair(size, tmp_path, embed_dim=16)
    torch.manual_seed(1)
    assert_stages_match(ours, ref, torch.randn(1, 3, 480, 352))


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
    cfg = LazyConfig.load(str(SAM2_CONFIGS.parent / "mask_rcnn_hiera_s.py"))
    overrides = ["layout=timm_abswin", "embed_dim=16"]
    cfg = LazyConfig.apply_overrides(cfg, [f"model.backbone.bottom_up.{o}" for o in overrides])
    ours = instantiate(cfg.model.backbone.bottom_up)
    ref = timm.create_model("hiera_small_abswin_256", pretrained=False, embed_dim=16)
    report = load_hiera_checkpoint(ours, ref.state_dict())
    assert report.missing == [] and report.unexpected == [] and report.resized == []
