"""tools/export_model.py and hiera_det.export: a detector trained a few steps, exported to ONNX and
run by ONNX Runtime, predicts what Detectron2's DefaultPredictor predicts; bad inputs are named."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, load_script, shrink_overrides
from detectron2.config import LazyConfig
from detectron2.engine import DefaultPredictor, default_argument_parser
from detectron2.structures import Boxes, Instances

from hiera_det.export import OnnxModelError, OnnxPredictor, canonical_model_config
from hiera_det.predictor import predictor_cfg

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

CONFIG = str(ROOT / "configs/mask_rcnn_hiera_t.py")
# Keep every detection: 30 steps leave the scores near the default threshold (0.05), where a
# 1e-8 difference could add or drop one. 50 proposals x 2 classes never exceed the 100 kept.
THRESHOLD = "model.roi_heads.box_predictor.test_score_thresh=0.0"
# Image sizes that exercise the resize (up and down), both orientations and a tiny image.
SHAPES = [(120, 90), (37, 300), (301, 20), (128, 128)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_coco) -> Path:
    """config.yaml and model_final.pth of a shrunk Mask R-CNN trained 30 steps by train_net.py."""
    out = tmp_path_factory.mktemp("trained")
    data = f"{tiny_coco.json_file},{tiny_coco.image_root}"
    train_net = load_script("train_net.py", "train_net_for_export")
    argv = ["--config-file", CONFIG, *shrink_overrides(128)]
    argv += [f"dataset.train=[tiny_export,{data}]", f"dataset.test=[tiny_export,{data}]"]
    argv += [f"train.output_dir={out}", "train.max_iter=30", "train.eval_period=0"]
    # 30 steps, not fewer: the scores of a barely trained RPN lie so close that the two runtimes'
    # rounding changes which proposals survive (in 1 of 40 seeds at 8 steps, 0 of 40 at 30).
    argv += ["train.seed=0"]
    # A from-scratch learning rate without the 250-step warm-up, so that the steps move the mask
    # probabilities off 0.5: at 0.5 +- 1e-7 (an untrained head) fp32-level differences between
    # the two runtimes flip single pixels of the pasted masks (IoU 0.988 on an 83-pixel mask).
    argv += ["optimizer.lr=1e-3", "lr_multiplier.warmup_factor=1.0"]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_net.main(default_argument_parser().parse_args(argv))
    finally:
        torch.set_num_threads(previous)
    return out


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> tuple[Path, dict]:
    """tools/export_model.py's folder for the trained model, and the report it returned."""
    out = tmp_path_factory.mktemp("onnx")
    tool = load_script("tools/export_model.py", "export_model")
    weights = f"train.init_checkpoint={trained / 'model_final.pth'}"
    argv = ["--config-file", str(trained / "config.yaml"), "--output", str(out), weights, THRESHOLD]
    report = tool.main(argv)
    return out, report


def images(tiny_coco) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in SHAPES]
    shapes = [cv2.imread(str(p)) for p in sorted(Path(tiny_coco.image_root).glob("*.jpg"))]
    return shapes + noise


def test_export_writes_a_checked_graph(exported):
    out, report = exported
    assert (out / "model.onnx").is_file() and (out / "config.yaml").is_file()
    assert (out / "export.json").is_file()
    check = report["check"]
    assert check["agree"], check
    assert (
        check["detections_pytorch"] == check["detections_onnx"] == check["detections_matched"] > 0
    )
    assert report["opset"] == 17 and report["export_s"] > 0


def test_onnx_predictor_matches_default_predictor(trained, exported, tiny_coco):
    out, _ = exported
    torch_predictor = DefaultPredictor(
        predictor_cfg(str(trained / "config.yaml"), str(trained / "model_final.pth"), [THRESHOLD])
    )
    onnx_predictor = OnnxPredictor(str(out / "config.yaml"), str(out / "model.onnx"), num_threads=1)
    assert not hasattr(onnx_predictor, "model")  # no Detectron2 model, only the ONNX session
    compare_instances = load_script("tools/compare_onnx.py", "compare_onnx").compare_instances
    compared = 0
    for image in images(tiny_coco):
        expected = torch_predictor(image)["instances"]
        got = onnx_predictor(image)["instances"]
        assert got.image_size == expected.image_size == image.shape[:2]
        assert got.pred_masks.shape[1:] == expected.pred_masks.shape[1:] == image.shape[:2]
        assert got.pred_masks.dtype == torch.bool
        result = compare_instances(expected, got)
        assert result["agree"], result
        compared += result["matched"]
    assert compared > 0  # the test compared detections, not only empty lists


def test_compare_instances_matches_by_value_and_names_what_differs():
    """Near-equal scores may come in either order; a moved box or a missing detection does not
    agree; a thin mask may differ in a few border pixels."""
    compare_instances = load_script("tools/compare_onnx.py", "compare_onnx").compare_instances
    masks = torch.zeros(3, 40, 60, dtype=torch.bool)
    masks[0, 5:30, 5:30], masks[1, 10:12, 10:50], masks[2, 20:35, 30:55] = True, True, True
    boxes = torch.tensor([[5.0, 5, 30, 30], [10, 10, 50, 12], [30, 20, 55, 35]])
    expected = _instances(boxes, [0.5, 0.0238186, 0.0238186 + 4e-9], [0, 1, 1], masks)
    swapped, thin = [0, 2, 1], masks.clone()
    thin[1, 12, 10:13] = True  # 3 more pixels on an 80-pixel mask: IoU 0.96
    got = _instances(boxes[swapped], expected.scores[swapped], [0, 1, 1], thin[swapped])
    result = compare_instances(expected, got)
    assert result["agree"] and result["matched"] == 3, result
    assert result["max_mask_pixels_differing"] == 3 and result["min_mask_iou"] < 0.99
    moved = boxes.clone()
    moved[2, 0] += 0.5
    result = compare_instances(expected, _instances(moved, expected.scores, [0, 1, 1], masks))
    assert not result["agree"] and result["matched"] == 2
    result = compare_instances(expected, _instances(boxes[:2], [0.5, 0.0238], [0, 1], masks[:2]))
    assert not result["agree"] and (result["pytorch"], result["onnx"]) == (3, 2)
    blotted = masks.clone()
    blotted[0, 30:32] = True  # 120 pixels more on a 625-pixel mask
    result = compare_instances(expected, _instances(boxes, expected.scores, [0, 1, 1], blotted))
    assert not result["agree"] and result["max_mask_pixels_differing"] == 120


def _instances(boxes, scores, classes, masks) -> Instances:
    instances = Instances(tuple(masks.shape[1:]))
    instances.pred_boxes = Boxes(boxes)
    instances.scores = torch.as_tensor(scores, dtype=torch.float32)
    instances.pred_classes = torch.as_tensor(classes)
    instances.pred_masks = masks
    return instances


def test_the_training_config_and_the_export_folder_config_are_the_same_model(trained, exported):
    out, _ = exported
    # The config.yaml of the training run (not the export folder's) is accepted as well.
    config = str(trained / "config.yaml")
    predictor = OnnxPredictor(config, str(out / "model.onnx"), [THRESHOLD], num_threads=1)
    assert predictor.metadata["config_file"] == str(trained / "config.yaml")
    assert predictor.metadata["checkpoint"] == str(trained / "model_final.pth")


def test_bad_inputs_are_named(exported, tmp_path):
    out, _ = exported
    config, onnx_file = str(out / "config.yaml"), str(out / "model.onnx")
    with pytest.raises(FileNotFoundError, match="ONNX file not found: .*missing.onnx"):
        OnnxPredictor(config, str(tmp_path / "missing.onnx"))
    with pytest.raises(FileNotFoundError, match="config file not found"):
        OnnxPredictor(str(tmp_path / "missing.py"), onnx_file)
    # Another config: the full-size T model, or the same one with another score threshold.
    with pytest.raises(OnnxModelError, match=r"model.onnx was exported from another model config"):
        OnnxPredictor(CONFIG, onnx_file)
    key = "model.roi_heads.box_predictor.test_score_thresh"
    with pytest.raises(OnnxModelError, match=rf"{key}: 0.0 in the ONNX file, 0.3 in the config"):
        OnnxPredictor(config, onnx_file, [f"{key}=0.3"])
    not_onnx = tmp_path / "not.onnx"
    not_onnx.write_text("hello")
    with pytest.raises(OnnxModelError, match="cannot load .*not.onnx as an ONNX model"):
        OnnxPredictor(config, str(not_onnx))
    other = tmp_path / "identity.onnx"
    torch.onnx.export(torch.nn.Identity(), (torch.zeros(1),), str(other), dynamo=False)
    with pytest.raises(OnnxModelError, match="identity.onnx is not a detector exported by"):
        OnnxPredictor(config, str(other))

    predictor = OnnxPredictor(config, onnx_file, num_threads=1)
    with pytest.raises(TypeError, match="dtype uint8 .* got dtype float32"):
        predictor(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\), got \(64, 64\)"):
        predictor(np.zeros((64, 64), np.uint8))


def cascade_overrides() -> list[str]:
    """`shrink_overrides` for a Cascade config (each stage's box head and predictor shrunk)."""
    opts = [
        o for o in shrink_overrides(128) if ".box_head." not in o and ".box_predictor." not in o
    ]
    for k in range(3):
        opts += [
            f"model.roi_heads.box_heads.{k}.input_shape.channels=32",
            f"model.roi_heads.box_heads.{k}.conv_dims=[32,32,32,32]",
            f"model.roi_heads.box_heads.{k}.fc_dims=[64]",
            f"model.roi_heads.box_predictors.{k}.input_shape.channels=64",
            # Random weights score each of 80 classes ~1/81: keep them all.
            f"model.roi_heads.box_predictors.{k}.test_score_thresh=0.0",
        ]
    return opts


def test_cascade_config_exports(tmp_path):
    # Mask R-CNN configs (quickstart among them) share the trained model's code path above.
    config = ROOT / "projects/ViTDet-Hiera/configs/COCO/cascade_mask_rcnn_hiera_b.py"
    tool = load_script("tools/export_model.py", "export_model")
    argv = ["--config-file", str(config), "--output", str(tmp_path), *cascade_overrides()]
    check = tool.main([*argv, "train.init_checkpoint="])["check"]  # random weights
    assert check["agree"] and check["detections_onnx"] > 0, check


@pytest.mark.parametrize(
    "config",
    [CONFIG, str(ROOT / "projects/ViTDet-Hiera/configs/COCO/cascade_mask_rcnn_hiera_b.py")],
)
def test_a_py_config_and_its_saved_yaml_give_the_same_model_config(config, tmp_path):
    cfg = LazyConfig.load(config)
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))  # targets as (shortened) dotted names
    canonical = canonical_model_config(cfg)
    assert canonical == canonical_model_config(LazyConfig.load(str(tmp_path / "config.yaml")))
    assert canonical["_target_"] == "detectron2.modeling.meta_arch.rcnn.GeneralizedRCNN"
    bad = LazyConfig.load(str(tmp_path / "config.yaml"))
    bad.model.backbone._target_ = "hiera_det.no_such_module.Thing"
    with pytest.raises(OnnxModelError, match="model.backbone._target_=.*names nothing importable"):
        canonical_model_config(bad)


def test_export_needs_a_fixed_square(tmp_path):
    tool = load_script("tools/export_model.py", "export_model")
    argv = ["--config-file", CONFIG, "--output", str(tmp_path), *shrink_overrides(128)]
    with pytest.raises(OnnxModelError, match="model.backbone.square_pad=1024"):
        tool.main([*argv, "model.backbone.square_pad=0"])


def test_demo_draws_with_the_onnx_model(exported, tmp_path):
    out, _ = exported
    image = np.random.default_rng(1).integers(0, 256, (100, 140, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "in.png"), image)
    demo = load_script("demo.py", "demo_onnx")
    written = demo.main(
        [
            "--config-file", str(out / "config.yaml"),
            "--onnx", str(out / "model.onnx"),
            "--input", str(tmp_path / "in.png"),
            "--output", str(tmp_path / "drawn"),
            "--confidence-threshold", "0.05",
        ]
    )  # fmt: skip
    assert written == [tmp_path / "drawn" / "in.png"]
    assert cv2.imread(str(written[0])) is not None
