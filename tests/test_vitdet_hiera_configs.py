"""projects/ViTDet-Hiera: every config loads, shrinks and trains one step and predicts; the shared
parts (cascade, simple feature pyramid, LVIS) say what ViTDet says; the baselines share the Hiera
recipe; the simple feature pyramid pads what Hiera needs."""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import is_ln
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import MViT, SwinTransformer, ViT
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid as D2SimpleFeaturePyramid
from detectron2.structures import BoxMode, ImageList
from detectron2.utils.events import EventStorage
from omegaconf import OmegaConf

from hiera_det.checkpoint import HieraCheckpointer
from hiera_det.modeling import Hiera, build_hiera
from hiera_det.modeling.simple_fpn import SimpleFeaturePyramid

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
PROJECT_CONFIGS = ROOT / "projects" / "ViTDet-Hiera" / "configs"
CONFIGS = sorted(p for p in PROJECT_CONFIGS.rglob("*.py") if "common" not in p.parts)
IMAGE_SIZE = 128
DATASET = "vitdet_hiera_test_shapes"
NUM_CLASSES = 2


def load(path: Path):
    return LazyConfig.load(str(path))


def config_id(path: Path) -> str:
    return str(path.relative_to(PROJECT_CONFIGS))


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory) -> str:
    """Register four 96-160 px images with 1-3 filled rectangles (two classes, polygon masks)
    under `DATASET`, with the `class_image_count` metadata the LVIS federated loss reads."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    dicts = []
    for i in range(4):
        h, w = (int(v) for v in rng.integers(96, 161, size=2))
        image = np.full((h, w, 3), 40, np.uint8)
        annotations = []
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            x1, y1 = int(rng.integers(x0 + 24, w)), int(rng.integers(y0 + 24, h))
            image[y0:y1, x0:x1] = rng.integers(120, 256, size=3)
            annotations.append(
                {
                    "bbox": [x0, y0, x1, y1],
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "category_id": int(rng.integers(0, NUM_CLASSES)),
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                    "iscrowd": 0,
                }
            )
        file_name = str(root / f"{i}.png")
        cv2.imwrite(file_name, image)
        dicts.append(
            {
                "file_name": file_name,
                "image_id": i,
                "height": h,
                "width": w,
                "annotations": annotations,
            }
        )
    if DATASET not in DatasetCatalog.list():
        DatasetCatalog.register(DATASET, lambda: copy.deepcopy(dicts))
        MetadataCatalog.get(DATASET).set(
            thing_classes=["a", "b"],
            class_image_count=[{"id": 1, "image_count": 3}, {"id": 2, "image_count": 1}],
        )
    return DATASET


def shrink_backbone(cfg) -> None:
    """Tiny widths and depths, keeping every kind of part each backbone has."""
    backbone = cfg.model.backbone
    net = backbone.bottom_up if "bottom_up" in backbone else backbone.net
    target = net._target_
    if target in (Hiera, build_hiera):
        # Mask unit attention (stages 1-2), the config's stage-3 windows (zero padded at 128 px),
        # global attention (block 3 and stage 4).
        net.update(embed_dim=16, num_heads=1, stages=[1, 1, 2, 1], global_blocks=[3])
    elif target is ViT:
        net.update(img_size=IMAGE_SIZE, embed_dim=32, depth=2, num_heads=2)
        net.window_block_indexes = [0]  # block 1 global
    elif target is MViT:
        net.update(img_size=IMAGE_SIZE, embed_dim=16, depth=4, last_block_indexes=(0, 1, 2, 3))
        net.adaptive_window_size = IMAGE_SIZE // 8  # stage 1 still windowed (2x2 windows)
    elif target is SwinTransformer:
        net.update(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    else:
        raise AssertionError(f"no shrink rule for backbone {target}: add one to this test")
    backbone.square_pad = IMAGE_SIZE


def shrink_heads(cfg, width: int = 32, fc: int = 64) -> None:
    """Pyramid, RPN and RoI heads at `width` channels (box head fc at `fc`), same structure."""
    model = cfg.model
    model.backbone.out_channels = width
    model.proposal_generator.head.in_channels = width
    model.proposal_generator.pre_nms_topk = [200, 100]
    model.proposal_generator.post_nms_topk = [64, 32]
    heads = model.roi_heads
    heads.batch_size_per_image = 32
    heads.num_classes = NUM_CLASSES
    cascade = "box_heads" in heads
    for box_head in heads.box_heads if cascade else [heads.box_head]:
        box_head.input_shape = ShapeSpec(channels=width, height=7, width=7)
        box_head.conv_dims = [width] * len(box_head.conv_dims)
        box_head.fc_dims = [fc] * len(box_head.fc_dims)
    for predictor in heads.box_predictors if cascade else [heads.box_predictor]:
        predictor.input_shape = ShapeSpec(channels=fc)
        predictor.test_topk_per_image = 20
        if predictor.get("use_fed_loss"):  # it samples this many classes: no more than there are
            predictor.fed_loss_num_classes = NUM_CLASSES
    heads.mask_head.input_shape = ShapeSpec(channels=width, height=14, width=14)
    heads.mask_head.conv_dims = [width] * len(heads.mask_head.conv_dims)


def shrink(cfg, dataset: str) -> None:
    shrink_backbone(cfg)
    shrink_heads(cfg)
    cfg.train.init_checkpoint = ""  # no downloads
    train, test = cfg.dataloader.train, cfg.dataloader.test
    train.dataset.names = test.dataset.names = dataset
    resize, crop = train.mapper.augmentations[1], train.mapper.augmentations[2]
    resize.update(target_height=IMAGE_SIZE, target_width=IMAGE_SIZE, min_scale=0.8, max_scale=1.2)
    crop.crop_size = [IMAGE_SIZE, IMAGE_SIZE]
    test.mapper.augmentations[0].update(short_edge_length=IMAGE_SIZE, max_size=IMAGE_SIZE)
    train.total_batch_size = 2
    train.num_workers = test.num_workers = 0


@pytest.mark.parametrize("path", CONFIGS, ids=config_id)
def test_config_trains_one_step_and_predicts(path: Path, shapes_dataset: str):
    cfg = load(path)
    shrink(cfg, shapes_dataset)
    torch.manual_seed(0)
    model = instantiate(cfg.model).train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    batch = next(iter(instantiate(cfg.dataloader.train)))

    with EventStorage():
        losses = model(batch)
    assert {"loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert any(k.startswith("loss_cls") for k in losses)  # "loss_cls_stage{k}" for a cascade
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    optimizer.zero_grad()
    total.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), (
        "no gradient reached the backbone"
    )
    before = [p.detach().clone() for p in model.backbone.parameters()]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.backbone.parameters())), (
        "the optimizer step changed no backbone weight"
    )

    model.eval()
    item = next(iter(instantiate(cfg.dataloader.test)))
    with torch.no_grad():
        (output,) = model(item)
    instances = output["instances"]
    assert instances.image_size == (item[0]["height"], item[0]["width"])
    assert {"pred_boxes", "scores", "pred_classes", "pred_masks"} <= set(instances.get_fields())


# ---------------------------------------------------------------------------------------------
# Cascade
# ---------------------------------------------------------------------------------------------

CASCADE_CONFIGS = [p for p in CONFIGS if p.name.startswith("cascade_")]


def test_cascade_configs_exist_for_b_b_plus_l():
    names = {p.name for p in CASCADE_CONFIGS}
    assert {f"cascade_mask_rcnn_hiera_{s}.py" for s in ("b", "b_plus", "l")} <= names


@pytest.mark.parametrize("path", CASCADE_CONFIGS, ids=config_id)
def test_cascade_is_mask_rcnn_plus_vitdet_cascade(path: Path):
    from detectron2.modeling.roi_heads import CascadeROIHeads

    cfg = load(path)
    base = LazyConfig.load(str(ROOT / "configs" / path.name.removeprefix("cascade_")))
    heads, base_heads = cfg.model.roi_heads, base.model.roi_heads
    assert issubclass(heads._target_, CascadeROIHeads)  # laying out the pooled maps once
    assert [m.thresholds for m in heads.proposal_matchers] == [[0.5], [0.6], [0.7]]
    assert not any(m.allow_low_quality_matches for m in heads.proposal_matchers)
    weights = [tuple(p.box2box_transform.weights) for p in heads.box_predictors]
    assert weights == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert all(p.cls_agnostic_bbox_reg for p in heads.box_predictors)
    for box_head in heads.box_heads:  # each stage: the Mask R-CNN 4conv1fc LN head
        assert OmegaConf.to_yaml(box_head) == OmegaConf.to_yaml(base_heads.box_head)
    # Everything else is the Mask R-CNN config's.
    for key in ("backbone", "proposal_generator"):
        assert OmegaConf.to_yaml(cfg.model[key]) == OmegaConf.to_yaml(base.model[key])
    for key in ("mask_head", "mask_pooler", "box_pooler", "num_classes"):
        assert OmegaConf.to_yaml({key: heads[key]}) == OmegaConf.to_yaml({key: base_heads[key]})
    for key in ("dataloader", "optimizer", "lr_multiplier", "train"):
        assert OmegaConf.to_yaml(cfg[key]) == OmegaConf.to_yaml(base[key])
    model_heads = instantiate(cfg.model.roi_heads)
    assert [p.num_classes for p in model_heads.box_predictor] == [80] * 3


# ---------------------------------------------------------------------------------------------
# Simple feature pyramid
# ---------------------------------------------------------------------------------------------


def tiny_hiera(**kwargs) -> Hiera:
    return Hiera(embed_dim=16, num_heads=1, stages=(1, 1, 2, 1), **kwargs)


def make_pyramid(cls, square_pad: int, net: Hiera | None = None):
    return cls(
        net=net or tiny_hiera(out_features=["res4"]),
        in_feature="res4",
        out_channels=32,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=LastLevelMaxPool(),
        norm="LN",
        square_pad=square_pad,
    )


def pad(backbone, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The batch size (H, W) that `GeneralizedRCNN.preprocess_image` pads images of `sizes` to."""
    images = [torch.zeros(3, h, w) for h, w in sizes]
    batch = ImageList.from_tensors(
        images, backbone.size_divisibility, padding_constraints=backbone.padding_constraints
    )
    return tuple(batch.tensor.shape[-2:])


def test_detectron2_simple_feature_pyramid_does_not_pad_to_its_stride():
    """The trap this project's `SimpleFeaturePyramid` exists for: without a square, Detectron2's
    version leaves the batch at its raw size (its constraint key is misspelled)."""
    d2 = make_pyramid(D2SimpleFeaturePyramid, square_pad=0)
    assert "size_divisibility" not in d2.padding_constraints
    assert pad(d2, [(100, 90)]) == (100, 90)


@pytest.mark.parametrize("square_pad", [0, 128, 1024])
def test_simple_feature_pyramid_pads_to_multiples_of_32(square_pad: int):
    fpn = make_pyramid(SimpleFeaturePyramid, square_pad)
    assert fpn.size_divisibility == 32
    assert fpn.padding_constraints == {"size_divisibility": 32, "square_size": square_pad}
    sizes = [(100, 90), (64, 120)]
    expected = (square_pad, square_pad) if square_pad else (128, 128)
    assert pad(fpn, sizes) == expected
    if square_pad <= 128:  # the padded batch runs through Hiera and gives p2..p6
        h, w = pad(fpn, sizes)
        out = fpn(torch.zeros(2, 3, h, w))
        assert {k: v.shape[-1] for k, v in out.items()} == {f"p{k}": w // 2**k for k in range(2, 7)}


def test_simple_feature_pyramid_divisibility_follows_the_net():
    """A pyramid from Hiera's stride-8 stage has strides 4-16, but Hiera needs multiples of 32."""
    fpn = SimpleFeaturePyramid(
        net=tiny_hiera(out_features=["res3"]),
        in_feature="res3",
        out_channels=16,
        scale_factors=(2.0, 1.0, 0.5),
    )
    assert fpn.size_divisibility == 32
    assert pad(fpn, [(100, 90)]) == (128, 96)
    fpn(torch.zeros(1, 3, 128, 96))


SIMPLE_FPN_CONFIGS = [p for p in CONFIGS if p.name.endswith("_simple_fpn.py")]


@pytest.mark.parametrize("path", SIMPLE_FPN_CONFIGS, ids=config_id)
def test_simple_fpn_config_builds_hiera_up_to_stage_3(path: Path):
    cfg = load(path)
    base = LazyConfig.load(str(ROOT / "configs" / path.name.replace("_simple_fpn", "")))
    assert cfg.model.backbone._target_ is SimpleFeaturePyramid
    assert cfg.model.backbone.in_feature == "res4"
    net = cfg.model.backbone.net
    assert list(net.out_features) == ["res4"]
    for key in ("size", "drop_path_rate", "num_global_blocks", "stage_windows"):  # same Hiera
        assert net[key] == base.model.backbone.bottom_up[key]
    for key in ("out_channels", "norm", "square_pad"):
        assert cfg.model.backbone[key] == base.model.backbone[key]
    assert cfg.train.init_checkpoint == base.train.init_checkpoint  # follows the moved Hiera
    shrink_backbone(cfg)
    backbone = instantiate(cfg.model.backbone)
    assert len(backbone.net.blocks) == 4  # stages (1, 1, 2, 1): stage 4 is not built
    shapes = backbone.output_shape()
    assert {k: (s.stride, s.channels) for k, s in shapes.items()} == {
        f"p{k}": (2**k, 256) for k in range(2, 7)
    }


def test_simple_fpn_model_loads_a_full_hiera_checkpoint(tmp_path):
    """An official-format checkpoint of the whole Hiera loads into the pyramid's net; the stage-4
    weights it does not build are reported, not an error."""
    full = tiny_hiera()
    path = tmp_path / "hiera.pth"
    torch.save({"model_state": full.state_dict()}, path)
    model = torch.nn.Module()
    model.backbone = make_pyramid(SimpleFeaturePyramid, square_pad=0)
    HieraCheckpointer(model).load(str(path))
    for key, value in model.backbone.net.state_dict().items():
        assert torch.equal(value, full.state_dict()[key]), key


# ---------------------------------------------------------------------------------------------
# LVIS
# ---------------------------------------------------------------------------------------------

LVIS_CONFIGS = [p for p in CONFIGS if p.parent.name == "LVIS"]


def test_lvis_configs_exist_for_b_and_l():
    assert {p.name for p in LVIS_CONFIGS} >= {"mask_rcnn_hiera_b.py", "mask_rcnn_hiera_l.py"}


@pytest.mark.parametrize("path", LVIS_CONFIGS, ids=config_id)
def test_lvis_config_has_vitdet_lvis_settings(path: Path):
    from hiera_det.data.lvis import build_lvis_evaluator, fed_loss_cls_weights
    from hiera_det.data.sampling import build_resumable_train_loader

    cfg = load(path)
    coco = LazyConfig.load(str(ROOT / "configs" / path.name))
    data = cfg.dataloader
    assert data.train.dataset.names == "lvis_v1_train"
    assert data.test.dataset.names == "lvis_v1_val"
    # Repeat-factor sampling through the resumable loader (not Detectron2's sampler).
    assert data.train._target_ is build_resumable_train_loader
    assert "sampler" not in data.train
    # Factors computed by the loader from the dicts it loads (the json is read once).
    assert data.train.repeat_thresh == 0.001 and "repeat_factors" not in data.train
    assert data.evaluator._target_ is build_lvis_evaluator
    assert data.evaluator.max_dets_per_image == 300
    assert data.evaluator.dataset_name == "lvis_v1_val"  # interpolation resolves
    predictor = cfg.model.roi_heads.box_predictor
    assert cfg.model.roi_heads.num_classes == 1203
    assert (predictor.test_score_thresh, predictor.test_topk_per_image) == (0.02, 300)
    assert predictor.use_sigmoid_ce and predictor.use_fed_loss
    weights = predictor.get_fed_loss_cls_weights
    assert weights._target_ is fed_loss_cls_weights
    assert (weights.dataset_names, weights.freq_weight_power) == ("lvis_v1_train", 0.5)
    # ViTDet's 100-epoch LVIS schedule at batch 64.
    assert cfg.train.max_iter == 156250
    assert list(cfg.lr_multiplier.scheduler.milestones) == [138889, 150463]
    assert cfg.lr_multiplier.warmup_length == pytest.approx(250 / 156250)
    # The rest is the COCO config's: backbone, heads' architecture, LSJ, optimizer family.
    assert OmegaConf.to_yaml(cfg.model.backbone) == OmegaConf.to_yaml(coco.model.backbone)
    assert OmegaConf.to_yaml(data.train.mapper) == OmegaConf.to_yaml(coco.dataloader.train.mapper)
    assert cfg.optimizer.weight_decay == coco.optimizer.weight_decay
    assert cfg.optimizer.lr == pytest.approx(2 * coco.optimizer.lr)  # ViTDet's COCO -> LVIS step


def test_lvis_fed_loss_weights_come_from_the_builtin_lvis_metadata():
    from hiera_det.data.lvis import fed_loss_cls_weights

    weights = fed_loss_cls_weights("lvis_v1_train", 0.5)()
    counts = sorted(MetadataCatalog.get("lvis_v1_train").class_image_count, key=lambda c: c["id"])
    assert weights.shape == (1203,)
    assert torch.allclose(weights, torch.tensor([c["image_count"] for c in counts]).float() ** 0.5)


def test_lvis_evaluator_without_the_lvis_package_says_how_to_install(monkeypatch):
    import importlib.util

    from hiera_det.data import lvis

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lvis" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps lvis"):
        lvis.build_lvis_evaluator("lvis_v1_val", max_dets_per_image=300)


# ---------------------------------------------------------------------------------------------
# Baselines: same recipe as Hiera-B, only the backbone (and its optimizer settings) differ
# ---------------------------------------------------------------------------------------------

BASELINES = {
    "mask_rcnn_vitdet_b.py": (ViT, 1e-4, 0.1),
    "mask_rcnn_mvitv2_b.py": (MViT, 8e-5, 0.1),
    "mask_rcnn_swin_b.py": (SwinTransformer, 4e-5, 0.05),
}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_shares_the_hiera_b_recipe(name: str):
    cfg = load(PROJECT_CONFIGS / "COCO" / name)
    hiera = LazyConfig.load(str(ROOT / "configs" / "mask_rcnn_hiera_b.py"))
    net_class, lr, weight_decay = BASELINES[name]
    backbone = cfg.model.backbone
    assert (backbone.net if "net" in backbone else backbone.bottom_up)._target_ is net_class
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (lr, weight_decay)
    assert cfg.train.init_checkpoint.startswith("detectron2://ImageNetPretrained/")
    for key in ("proposal_generator", "roi_heads", "pixel_mean", "pixel_std", "input_format"):
        assert OmegaConf.to_yaml({key: cfg.model[key]}) == OmegaConf.to_yaml(
            {key: hiera.model[key]}
        )
    for key in ("dataloader", "lr_multiplier"):
        assert OmegaConf.to_yaml(cfg[key]) == OmegaConf.to_yaml(hiera[key])
    assert cfg.train.max_iter == hiera.train.max_iter
    assert cfg.optimizer._target_ is hiera.optimizer._target_
    assert cfg.optimizer.params._target_ is hiera.optimizer.params._target_
    assert is_ln(backbone.norm) and (backbone.out_channels, backbone.square_pad) == (256, 1024)
