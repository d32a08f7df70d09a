"""Detectron2's own DefaultPredictor runs a LazyConfig Hiera model through `predictor_cfg`."""

import numpy as np
import pytest
import torch
from conftest import shrink_overrides
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import DefaultPredictor

from hiera_det import predictor_cfg
from hiera_det.data.datasets import apply_dataset_config

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
