"""Prediction on images (hiera_det.predictor): Detectron2's own `DefaultPredictor` runs a LazyConfig
Hiera model through `predictor_cfg` and reads its weights as data only; `RobustPredictor` takes
image files and arrays of every mode."""

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, assert_refused, shrink_overrides
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import DefaultPredictor
from PIL import Image

from hiera_det.data.datasets import apply_dataset_config
from hiera_det.predictor import predictor_cfg

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = "configs/mask_rcnn_hiera_b.py"
# Score threshold 0: a randomly initialised model then always returns detections.
OPTS = [*shrink_overrides(128), "model.roi_heads.box_predictor.test_score_thresh=0.0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_coco):
    """A config.yaml and model_final.pth as train_net.py leaves them (2 classes)."""
    out = tmp_path_factory.mktemp("predictor")
    cfg = LazyConfig.apply_overrides(LazyConfig.load(CONFIG), OPTS)
    cfg.dataset = {"test": ["tiny_predictor", tiny_coco.json_file, tiny_coco.image_root]}
    apply_dataset_config(cfg)
    LazyConfig.save(cfg, str(out / "config.yaml"))
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    DetectionCheckpointer(model, str(out)).save("model_final")
    return out, model.state_dict()


def test_predictor_cfg_from_the_lazy_config(trained):
    out, _ = trained
    cfg = predictor_cfg(str(out / "config.yaml"), str(out / "model_final.pth"))
    assert cfg.MODEL.META_ARCHITECTURE == "LazyConfigModel"
    assert cfg.INPUT.FORMAT == "RGB"  # the model's input format: DefaultPredictor flips BGR
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (128, 128)
    assert cfg.DATASETS.TEST == ("tiny_predictor",)
    full = predictor_cfg(CONFIG, str(out / "model_final.pth"))  # a .py config, no overrides
    assert (full.INPUT.MIN_SIZE_TEST, full.INPUT.MAX_SIZE_TEST) == (1024, 1024)


@pytest.mark.parametrize("shape", [(120, 90), (37, 300), (301, 20), (16, 16)])
def test_default_predictor_returns_instances(trained, shape):
    out, state = trained
    predictor = DefaultPredictor(
        predictor_cfg(str(out / "config.yaml"), str(out / "model_final.pth"))
    )
    # The checkpoint was loaded (not a fresh random model).
    for key in (
        "backbone.bottom_up.blocks.0.attn.qkv.weight",
        "roi_heads.box_predictor.cls_score.weight",
    ):
        torch.testing.assert_close(predictor.model.state_dict()[key], state[key])
    assert predictor.model.roi_heads.num_classes == 2
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    instances = predictor(image)["instances"]
    assert instances.image_size == shape
    assert len(instances) > 0
    assert instances.pred_masks.shape[1:] == shape
    assert set(instances.pred_classes.tolist()) <= {0, 1}


def test_clear_errors(trained, tmp_path):
    out, _ = trained
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        predictor_cfg(str(out / "config.yaml"), str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="config file not found"):
        predictor_cfg(str(tmp_path / "missing.py"), str(out / "model_final.pth"))
    cfg = LazyConfig.load(str(out / "config.yaml"))
    cfg.dataloader.test.mapper.augmentations = []
    LazyConfig.save(cfg, str(tmp_path / "no_resize.yaml"))
    with pytest.raises(ValueError, match="no ResizeShortestEdge"):
        predictor_cfg(str(tmp_path / "no_resize.yaml"), str(out / "model_final.pth"))


def test_default_predictor_refuses_code(evil, tiny_coco, tmp_path):
    pth, pkl, flag = evil
    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(str(ROOT / "configs/mask_rcnn_hiera_t.py")), shrink_overrides(128)
    )
    cfg.dataset = {"test": ["tiny_safe_predictor", tiny_coco.json_file, tiny_coco.image_root]}
    apply_dataset_config(cfg)
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    for weights in (pth, pkl):
        yacs = predictor_cfg(str(tmp_path / "config.yaml"), str(weights))
        assert_refused(lambda yacs=yacs: DefaultPredictor(yacs), weights, flag)


@pytest.fixture(scope="module")
def predictor():
    """A small Detectron2 Mask R-CNN (R18-FPN, random weights) behind `RobustPredictor`."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    from hiera_det.predictor import RobustPredictor

    cfg = get_cfg()
    cfg.merge_from_file(
        model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    )
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    cfg.INPUT.FORMAT = "RGB"
    return RobustPredictor(cfg)


def test_predictor_takes_every_image_mode_and_size(predictor, tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "gray16.png"), rng.integers(0, 65536, (50, 40), dtype=np.uint16))
    Image.fromarray(np.dstack([rgb, rgb[..., 0]])).save(tmp_path / "rgba.png")
    inputs = {
        "rgb": rgb,
        "gray": rgb[..., 0],
        "gray [H,W,1]": rgb[..., :1],
        "rgba": np.dstack([rgb, rgb[..., 0]]),
        "16-bit": rgb.astype(np.uint16) * 257,
        "float": rgb / 255.0,
        "tiny 8x8": rgb[:8, :8],
        "1x1": rgb[:1, :1],
        "very large 3000x4000": np.zeros((3000, 4000), np.uint8),
        "file 16-bit gray": str(tmp_path / "gray16.png"),
        "file rgba": str(tmp_path / "rgba.png"),
    }
    for what, image in inputs.items():
        instances = predictor(image)["instances"]
        shape = (
            cv2.imread(image, cv2.IMREAD_UNCHANGED).shape if isinstance(image, str) else image.shape
        )
        assert instances.image_size == shape[:2], what
    # The same picture as gray uint8, gray uint16 and gray float gives the same input.
    gray = rgb[..., 1]
    a = predictor(gray)["instances"].scores
    for same in (gray.astype(np.uint16) * 257, gray / 255.0, np.repeat(gray[..., None], 3, 2)):
        assert torch.equal(predictor(same)["instances"].scores, a)


def test_predictor_reads_a_file_as_default_predictor_reads_its_bgr_array(
    predictor, tmp_path, monkeypatch
):
    """A file goes to the model as `DefaultPredictor` sends the BGR array OpenCV reads from it
    (the predictor's model takes RGB: `DefaultPredictor` flips BGR itself)."""
    from detectron2.engine import DefaultPredictor

    rng = np.random.default_rng(1)
    cv2.imwrite(str(tmp_path / "colour.png"), rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    seen = []
    monkeypatch.setattr(predictor, "model", lambda inputs: seen.append(inputs[0]) or [{}])
    predictor(str(tmp_path / "colour.png"))
    DefaultPredictor.__call__(predictor, cv2.imread(str(tmp_path / "colour.png")))
    assert predictor.input_format == "RGB"
    assert torch.equal(seen[0]["image"], seen[1]["image"])
