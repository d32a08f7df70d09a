"""On a CUDA GPU: fp32 outputs match the CPU's, AMP training steps train, DefaultPredictor, the MAE.

Every test here is marked ``cuda`` and skipped where ``torch.cuda.is_available()`` is False, so
the CPU suite passes unchanged; ``pytest -m cuda`` (tools/gpu_check.py runs it) runs them on a GPU.
``HIERA_DET_CUDA_TESTS_DEVICE=cpu`` runs the same tests on the CPU instead, to check the tests
themselves on a machine without a GPU (the parity checks then compare the CPU with itself, and the
AMP steps run in fp32 through Detectron2's `SimpleTrainer`, since its `AMPTrainer` needs CUDA).

fp32 comparisons turn TF32 off (cuDNN allows it for convolutions by default) so that both sides
compute in full fp32: ‖gpu - cpu‖ / ‖cpu‖ then lands far under 1e-4.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shrink_overrides

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("HIERA_DET_CUDA_TESTS_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONFIG = str(ROOT / "configs/mask_rcnn_hiera_b.py")
# The real Hiera-B detector at 512 px (windowed stage 3: 2x2 windows of 8x8 units).
DETECTOR_512 = [
    "model.backbone.square_pad=512",
    "model.backbone.bottom_up.drop_path_rate=0.0",
    "model.roi_heads.box_predictor.test_score_thresh=0.0",
]
TINY = [*shrink_overrides(128), "model.roi_heads.box_predictor.test_score_thresh=0.0"]


@pytest.fixture
def strict_fp32():
    """Full fp32 on the GPU, as on the CPU: no TF32 in matmuls or convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got - ref‖ / ‖ref‖ (‖got‖ where ref is all zeros)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if not ref.any():
        return got.norm().item()
    return ((got - ref).norm() / ref.norm()).item()


def detector(opts: list[str]):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.apply_overrides(LazyConfig.load(CONFIG), opts)
    torch.manual_seed(0)
    return instantiate(cfg.model)


def synthetic_inputs(num: int, size: int, with_targets: bool) -> list[dict]:
    """Detectron2 inputs of the synthetic shapes dataset's images (exact masks and boxes)."""
    from detectron2.structures import BitMasks, Instances

    from hiera_det.data.synthetic import SyntheticSpec, draw_image

    spec = SyntheticSpec(image_size=(size, size))
    inputs = []
    for i in range(num):
        image, classes, masks = draw_image(spec, np.random.default_rng([0, i]))
        item = {"image": torch.from_numpy(image.transpose(2, 0, 1).copy()).float()}
        item.update(height=size, width=size)
        if with_targets:
            inst = Instances((size, size))
            inst.gt_masks = BitMasks(torch.from_numpy(np.stack(masks)))
            inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
            inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
            item["instances"] = inst
        inputs.append(item)
    return inputs


# --- fp32 parity -------------------------------------------------------------------------------


def test_hiera_b_backbone_fp32_on_cuda_matches_cpu(strict_fp32):
    from hiera_det.modeling import build_hiera

    torch.manual_seed(0)
    cpu = build_hiera("base", stage_windows=[1, 1, 8, 0], global_blocks=[8], use_sdpa=True).eval()
    gpu = copy.deepcopy(cpu).to(DEVICE)
    x = torch.randn(2, 3, 512, 512)
    with torch.no_grad():
        ref, got = cpu(x), gpu(x.to(DEVICE))
    for name in ("res2", "res3", "res4", "res5"):
        assert got[name].device.type == DEVICE
        assert relative(got[name], ref[name]) <= 1e-4, name


def test_hiera_b_detector_fp32_on_cuda_matches_cpu(strict_fp32):
    """Features, RPN outputs, box and mask head outputs on the same proposals, and detections."""
    cpu = detector(DETECTOR_512).eval()
    gpu = copy.deepcopy(cpu).to(DEVICE)
    inputs = synthetic_inputs(2, 512, with_targets=False)
    with torch.no_grad():
        ref, proposals = head_outputs(cpu, inputs)
        got, _ = head_outputs(gpu, inputs, proposals)  # the CPU's proposals on both
        outputs = {"cpu": cpu(inputs), "gpu": gpu(inputs)}
    assert list(got) == list(ref) and len(ref) == 5 + 2 * 5 + 3  # p2-p6, RPN per level, heads
    for name in ref:
        assert got[name].device.type == DEVICE, name
        assert relative(got[name], ref[name]) <= 1e-4, name
    for out_cpu, out_gpu in zip(outputs["cpu"], outputs["gpu"]):
        a, b = out_cpu["instances"], out_gpu["instances"]
        assert b.pred_masks.device.type == DEVICE and b.pred_masks.shape[1:] == (512, 512)
        assert len(a) == len(b) > 10
        # The best detections agree (ties at the end of the list may fall either way).
        top_a = a.scores.sort(descending=True).values[:10]
        top_b = b.scores.sort(descending=True).values[:10].cpu()
        torch.testing.assert_close(top_b, top_a, atol=1e-4, rtol=1e-3)


def head_outputs(model, inputs: list[dict], proposals=None) -> tuple[dict, list]:
    """(every stage's raw output for `inputs`, the proposals the RoI heads ran on): the given
    `proposals`, else the model's own."""
    images = model.preprocess_image(inputs)
    feats = model.backbone(images.tensor)
    if proposals is None:
        proposals, _ = model.proposal_generator(images, feats)
    out = {f"feature {k}": v for k, v in feats.items()}
    rpn = model.proposal_generator
    objectness, deltas = rpn.rpn_head([feats[f] for f in rpn.in_features])
    for level, (o, d) in enumerate(zip(objectness, deltas)):
        out[f"rpn objectness {level}"], out[f"rpn deltas {level}"] = o, d
    heads = model.roi_heads
    boxes = [p.proposal_boxes.to(model.device) for p in proposals]
    x = heads.box_pooler([feats[f] for f in heads.box_in_features], boxes)
    out["box scores"], out["box deltas"] = heads.box_predictor(heads.box_head(x))
    x = heads.mask_pooler([feats[f] for f in heads.mask_in_features], boxes)
    out["mask logits"] = heads.mask_head.layers(x)
    return out, proposals


# --- AMP training --------------------------------------------------------------------------------


class _Repeat:
    """A data loader that yields the same batch forever (Detectron2's trainers iterate it)."""

    def __init__(self, batch: list[dict]):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


@pytest.mark.parametrize("precision", [torch.float16, torch.bfloat16])
def test_amp_trainer_steps_are_finite_and_the_loss_falls(precision):
    from detectron2.engine import AMPTrainer, SimpleTrainer

    model = detector(TINY).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loader = _Repeat(synthetic_inputs(2, 128, with_targets=True))
    if ON_GPU:
        trainer = AMPTrainer(model, loader, optimizer, precision=precision)
    else:  # AMPTrainer asserts CUDA: check the rest of this test in fp32
        trainer = SimpleTrainer(model, loader, optimizer)
    steps = 20
    trainer.train(0, steps)
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
    for p in model.parameters():
        assert torch.isfinite(p).all()
    # fp16: the first steps may be skipped while the grad scaler finds its scale.
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert last < 0.9 * first, losses
    if ON_GPU and precision is torch.float16:
        assert trainer.grad_scaler.get_scale() > 0


# --- DefaultPredictor ---------------------------------------------------------------------------


def test_default_predictor_runs_on_cuda_and_agrees_with_cpu(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import DefaultPredictor

    from hiera_det.predictor import predictor_cfg

    model = detector(TINY)
    DetectionCheckpointer(model, str(tmp_path)).save("model_final")
    cfg = predictor_cfg(CONFIG, str(tmp_path / "model_final.pth"), TINY)
    if ON_GPU:
        assert cfg.MODEL.DEVICE == "cuda"
    cfg_cpu = cfg.clone()
    cfg_cpu.defrost()
    cfg_cpu.MODEL.DEVICE = "cpu"
    image = synthetic_inputs(1, 128, with_targets=False)[0]["image"]
    bgr = image.permute(1, 2, 0).numpy().astype(np.uint8)[:, :, ::-1].copy()
    got = DefaultPredictor(cfg)(bgr)["instances"]
    ref = DefaultPredictor(cfg_cpu)(bgr)["instances"]
    assert got.pred_boxes.tensor.device.type == DEVICE
    assert got.image_size == (128, 128) and got.pred_masks.shape[1:] == (128, 128)
    assert torch.isfinite(got.pred_boxes.tensor).all()
    assert len(got) == len(ref) > 0
    top_ref = ref.scores.sort(descending=True).values[:5]
    top_got = got.scores.sort(descending=True).values[:5].cpu()
    torch.testing.assert_close(top_got, top_ref, atol=1e-3, rtol=1e-3)


# --- MAE ---------------------------------------------------------------------------------------

TINY_MAE = dict(
    pretrain_img_size=128,
    embed_dim=16,
    num_heads=1,
    stages=(1, 1, 2, 1),
    decoder_embed_dim=32,
    decoder_depth=2,
    decoder_num_heads=4,
)


def test_mae_loss_and_gradients_on_cuda_match_cpu_and_the_official_model(strict_fp32):
    from hiera_det.checkpoint import convert_mae_checkpoint
    from hiera_det.mae import build_mae

    torch.manual_seed(0)
    cpu = build_mae("tiny", **TINY_MAE)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    x = torch.randn(4, 3, 128, 128)
    visible = cpu.random_visible(4, (4, 4))
    loss_cpu = cpu.reconstruct(x, visible)[0]
    loss_gpu = gpu.reconstruct(x.to(DEVICE), visible.to(DEVICE))[0]
    assert loss_gpu.device.type == DEVICE
    assert relative(loss_gpu, loss_cpu) <= 1e-5
    loss_cpu.backward()
    loss_gpu.backward()
    gpu_params = dict(gpu.named_parameters())
    for key, p in cpu.named_parameters():
        assert relative(gpu_params[key].grad, p.grad) <= 1e-4, key

    hiera_mae = pytest.importorskip("hiera.hiera_mae")
    enc = {k: TINY_MAE[k] for k in ("embed_dim", "num_heads", "stages")}
    dec = {k: v for k, v in TINY_MAE.items() if k.startswith("decoder")}
    official = hiera_mae.MaskedAutoencoderHiera(input_size=(128, 128), q_pool=2, **enc, **dec)
    official.load_state_dict(
        {k[len("encoder.") :] if k.startswith("encoder.") else k: v
         for k, v in cpu.state_dict().items()},
        strict=True,
    )  # fmt: skip
    assert set(convert_mae_checkpoint(official.state_dict())) == set(cpu.state_dict())
    with torch.no_grad():
        loss_official = official.to(DEVICE)(x.to(DEVICE), mask=visible.to(DEVICE))[0]
    assert relative(loss_official, loss_cpu) <= 1e-5


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_mae_amp_steps_are_finite_and_the_loss_falls(amp):
    from hiera_det.mae import build_mae

    torch.manual_seed(0)
    model = build_mae("tiny", **TINY_MAE).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(DEVICE, enabled=amp is torch.float16)
    # Smooth images (a reconstructable signal) and fixed masks: the loss must fall.
    x = torch.nn.functional.interpolate(torch.randn(8, 3, 8, 8), size=128, mode="bilinear")
    x = x.to(DEVICE)
    visible = model.random_visible(8, (4, 4))
    losses = []
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=amp, enabled=ON_GPU or amp is torch.bfloat16):
            loss = model.reconstruct(x, visible)[0]
        assert loss.dtype == torch.float32  # the loss is computed in fp32 under autocast
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    # The normalised-pixel loss starts near 1 and falls about 1% a step here.
    assert np.mean(losses[-3:]) < 0.95 * np.mean(losses[:3]), losses
