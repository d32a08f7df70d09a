"""Every Mask R-CNN config: the paper's recipe is what it says, and it loads, saves, shrinks, trains
one step and predicts."""

from pathlib import Path

import pytest
import torch
from conftest import ROOT, is_ln, mae_shrink_overrides, shrink_overrides
from detectron2.config import LazyConfig, instantiate
from detectron2.layers.batch_norm import LayerNorm as ChannelsFirstLayerNorm
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from hiera_det.data.datasets import apply_dataset_config
from hiera_det.modeling import HIERA_SIZES, SAM2_HIERA_SIZES, Hiera, build_hiera

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# config suffix -> (Hiera size, drop path, lr); B, B+ and L are Table 15, T, S and H ours.
RECIPES = {
    "t": ("tiny", 0.1, 3.5e-5),
    "s": ("small", 0.1, 3.5e-5),
    "b": ("base", 0.2, 3.5e-5),
    "b_plus": ("base_plus", 0.2, 3.5e-5),
    "l": ("large", 0.4, 3e-5),
    "h": ("huge", 0.5, 3e-5),
}
TABLE_10_PARAMS = {"b": 73e6, "b_plus": 92e6, "l": 236e6}
# configs/sam2: suffix -> (SAM 2 size, drop path, lr): the same per-size values as above.
SAM2_RECIPES = {
    "sam2/t": ("tiny", 0.1, 3.5e-5),
    "sam2/s": ("small", 0.1, 3.5e-5),
    "sam2/b_plus": ("base_plus", 0.2, 3.5e-5),
    "sam2/l": ("large", 0.4, 3e-5),
}
SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_{}.pt"


def load(suffix: str, overrides=()):
    """The config of `suffix`: "b" -> mask_rcnn_hiera_b.py, "sam2/b_plus" -> sam2/..._b_plus.py."""
    folder, _, suffix = suffix.rpartition("/")
    cfg = LazyConfig.load(str(CONFIGS / folder / f"mask_rcnn_hiera_{suffix}.py"))
    return LazyConfig.apply_overrides(cfg, list(overrides))


def target_name(node) -> str:
    target = node._target_
    return target if isinstance(target, str) else target.__name__


def test_one_config_per_size():
    found = {p.stem.removeprefix("mask_rcnn_hiera_") for p in CONFIGS.glob("mask_rcnn_hiera_*.py")}
    assert found == set(RECIPES)
    assert {size for size, _, _ in RECIPES.values()} == set(HIERA_SIZES)
    sam2 = {f"sam2/{p.stem.removeprefix('mask_rcnn_hiera_')}" for p in CONFIGS.glob("sam2/mask_*")}
    assert sam2 == set(SAM2_RECIPES)
    assert {size for size, _, _ in SAM2_RECIPES.values()} == set(SAM2_HIERA_SIZES)


@pytest.mark.parametrize("suffix", SAM2_RECIPES)
def test_sam2_recipe(suffix, monkeypatch):
    """The paper's detector and schedule (as the MAE configs) on SAM 2's trunk, SAM 2.1 weights."""
    size, drop_path, lr = SAM2_RECIPES[suffix]
    cfg, paper = load(suffix), load("b")
    hiera = cfg.model.backbone.bottom_up
    assert (hiera.size, hiera.layout, hiera.drop_path_rate, cfg.optimizer.lr) == (
        size, "sam2", drop_path, lr
    )  # fmt: skip
    assert cfg.train.init_checkpoint == SAM2_URL.format(size)
    args = hiera_arguments(hiera, monkeypatch)
    assert {k: args[k] for k in SAM2_HIERA_SIZES[size]} == SAM2_HIERA_SIZES[size]
    for part in ("dataloader", "lr_multiplier"):
        assert LazyConfig.to_py(cfg[part]) == LazyConfig.to_py(paper[part]), part
    assert cfg.train.max_iter == paper.train.max_iter
    paper.model.backbone.bottom_up = cfg.model.backbone.bottom_up  # all but the backbone: same
    assert LazyConfig.to_py(cfg.model) == LazyConfig.to_py(paper.model)


def hiera_arguments(node, monkeypatch) -> dict:
    """The arguments `Hiera` is built with when `node` is instantiated (nothing is built)."""
    seen = {}

    def record(self, **kwargs):
        seen.update(kwargs)
        raise InterruptedError

    monkeypatch.setattr(Hiera, "__init__", record)
    with pytest.raises(InterruptedError):
        instantiate(node)
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("suffix", RECIPES)
def test_recipe(suffix, monkeypatch):
    size, drop_path, lr = RECIPES[suffix]
    cfg = load(suffix)
    hiera = cfg.model.backbone.bottom_up
    assert (hiera.size, hiera.drop_path_rate, cfg.optimizer.lr) == (size, drop_path, lr)
    assert cfg.train.init_checkpoint.endswith(f"/hiera/mae_hiera_{size}_224.pth")
    # Attention: stage 3 windowed with global blocks inside stage 3 only.
    stages = HIERA_SIZES[size]["stages"]
    stage3 = range(sum(stages[:2]), sum(stages[:3]))
    assert list(hiera.stage_windows) == [1, 1, 8, 0]
    global_blocks = hiera_arguments(hiera, monkeypatch)["global_blocks"]
    assert len(set(global_blocks)) == 4 and all(b in stage3 for b in global_blocks)
    assert global_blocks[-1] == stage3[-1]
    # Table 15 and ViTDet's 100-epoch schedule.
    assert cfg.dataloader.train.total_batch_size == 64
    assert tuple(cfg.optimizer.betas) == (0.9, 0.999) and cfg.optimizer.weight_decay == 0.1
    assert cfg.optimizer.params.weight_decay_norm == 0.0
    assert cfg.optimizer.params.get("lr_factor_func") is None  # no layer-wise decay
    assert cfg.train.max_iter == 184375
    assert list(cfg.lr_multiplier.scheduler.milestones) == [163889, 177546]
    assert cfg.lr_multiplier.warmup_length * cfg.train.max_iter == pytest.approx(250)
    assert cfg.lr_multiplier.warmup_factor == 0.001
    assert cfg.train.amp.enabled
    # LSJ at 1024, test at 1024.
    flip, scale, crop = cfg.dataloader.train.mapper.augmentations
    assert target_name(flip) == "RandomFlip" and flip.horizontal
    assert (scale.min_scale, scale.max_scale, scale.target_height) == (0.1, 2.0, 1024)
    assert tuple(crop.crop_size) == (1024, 1024)
    (resize,) = cfg.dataloader.test.mapper.augmentations
    assert (resize.short_edge_length, resize.max_size) == (1024, 1024)
    assert cfg.model.backbone.square_pad == 1024 and is_ln(cfg.model.backbone.norm)
    # Heads: RPN 2 conv + LN, box 4 conv (LN) + 1 fc, mask 4 conv (LN) + deconv.
    head = cfg.model.proposal_generator.head
    assert (target_name(head), len(head.conv_dims)) == ("ConvNormRPNHead", 2)
    assert is_ln(head.conv_norm)
    box = cfg.model.roi_heads.box_head
    assert (len(box.conv_dims), list(box.fc_dims)) == (4, [1024]) and is_ln(box.conv_norm)
    mask = cfg.model.roi_heads.mask_head
    assert len(mask.conv_dims) == 5 and is_ln(mask.conv_norm)


def test_size_override_moves_the_global_blocks_and_the_weights(monkeypatch):
    """`size` is the only size-dependent value a size config sets: overriding it on the command
    line gives that size's global blocks (the last block of each quarter of stage 3) and weights."""
    cfg = load("b", ["model.backbone.bottom_up.size=large"])
    args = hiera_arguments(cfg.model.backbone.bottom_up, monkeypatch)
    assert tuple(args["stages"]) == (2, 6, 36, 4)
    assert list(args["global_blocks"]) == [16, 25, 34, 43]  # stage 3 = blocks 8..43
    assert cfg.train.init_checkpoint.endswith("/hiera/mae_hiera_large_224.pth")
    base = hiera_arguments(load("b").model.backbone.bottom_up, monkeypatch)
    assert list(base["global_blocks"]) == [8, 12, 16, 20]  # stage 3 = blocks 5..20
    with pytest.raises(ValueError, match="cannot spread 8 global blocks over a stage 3 of 7"):
        build_hiera("tiny", num_global_blocks=8)


@pytest.mark.parametrize("suffix", TABLE_10_PARAMS)
def test_parameters_match_table_10(suffix, monkeypatch):
    # Only shapes matter here: skip the (slow) random initialisation of 73M-236M parameters.
    for name in dir(torch.nn.init):
        if name.endswith("_") and not name.startswith("_"):
            monkeypatch.setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    model = instantiate(load(suffix).model)
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(TABLE_10_PARAMS[suffix], rel=0.02)
    # The stored position table stays at pretraining size (resized at run time).
    assert model.backbone.bottom_up.pos_embed.shape[1] == 56 * 56


@pytest.mark.parametrize("suffix", [*RECIPES, *SAM2_RECIPES])
def test_shrinks_saves_trains_and_predicts(suffix, tiny_coco, tmp_path):
    cfg = load(suffix, shrink_overrides(128))
    name = f"tiny_cfg_{suffix.replace('/', '_')}"
    cfg.dataset = {
        "train": [name, tiny_coco.json_file, tiny_coco.image_root],
        "test": [name, tiny_coco.json_file, tiny_coco.image_root],
    }
    apply_dataset_config(cfg)
    assert cfg.model.roi_heads.num_classes == tiny_coco.num_classes
    # What Detectron2's default_setup does: save the config. It must round-trip (no lambdas).
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    assert not (tmp_path / "config.yaml.pkl").exists()
    cfg = LazyConfig.load(str(tmp_path / "config.yaml"))

    torch.manual_seed(0)
    model = instantiate(cfg.model)
    assert isinstance(model.backbone.bottom_up, Hiera)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    instantiate(cfg.lr_multiplier)
    batch = next(iter(instantiate(cfg.dataloader.train)))
    assert all(tuple(d["image"].shape[1:]) <= (128, 128) for d in batch)

    model.train()
    with EventStorage():
        losses = model(batch)
    assert set(losses) >= {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    optimizer.zero_grad()
    total.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters without a gradient (DDP would fail): {unused[:5]}"
    before = model.backbone.bottom_up.blocks[0].attn.qkv.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.backbone.bottom_up.blocks[0].attn.qkv.weight)

    model.eval()
    inputs = next(iter(instantiate(cfg.dataloader.test)))
    with torch.no_grad():
        (out,) = model(inputs)
    assert isinstance(out["instances"], Instances)
    assert out["instances"].image_size == (inputs[0]["height"], inputs[0]["width"])


def test_no_weight_decay_on_norms_and_position_table():
    cfg = load("b", shrink_overrides(128))
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    decay = {}
    for group in instantiate(cfg.optimizer).param_groups:
        for p in group["params"]:
            decay[id(p)] = group["weight_decay"]
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            norm = isinstance(module, (torch.nn.LayerNorm, ChannelsFirstLayerNorm))
            expected = 0.0 if norm or pname.startswith("pos_embed") else 0.1
            assert decay[id(p)] == expected, f"{name}.{pname}"


# --- MAE pretraining configs (configs/mae/) ----------------------------------------------

MAE_DROP_PATH = {"t": 0.0, "s": 0.0, "b": 0.2, "b_plus": 0.2, "l": 0.2, "h": 0.3}  # Table 14a
MAE_SIZES = {
    "t": "tiny",
    "s": "small",
    "b": "base",
    "b_plus": "base_plus",
    "l": "large",
    "h": "huge",
}


@pytest.mark.parametrize("name", list(MAE_DROP_PATH))
def test_every_mae_config_follows_table_14a_and_runs_shrunk(name, tmp_path):
    cfg = LazyConfig.load(str(ROOT / f"configs/mae/mae_hiera_{name}.py"))
    enc = cfg.model.encoder
    assert (enc.size, enc.drop_path_rate, enc.q_pool) == (MAE_SIZES[name], MAE_DROP_PATH[name], 2)
    m = cfg.model
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == (512, 8, 16)
    assert (m.mask_ratio, cfg.dataloader.train.scale, cfg.dataloader.train.img_size) == (
        0.6,
        (0.2, 1.0),
        224,
    )
    assert (cfg.optimizer.betas, cfg.optimizer.weight_decay) == ((0.9, 0.95), 0.05)
    assert (cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.base_lr) == (400, 40, 8e-4)

    cfg = LazyConfig.apply_overrides(cfg, mae_shrink_overrides())
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    assert model.encoder.blocks[-1].drop_path.__class__.__name__ == (
        "DropPath" if MAE_DROP_PATH[name] else "Identity"
    )
    losses = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(losses["loss_mae"])
