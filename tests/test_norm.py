"""`channel_layer_norm` (timm's `LayerNorm2d`) computes Detectron2's channels-first "LN" (the
authority) in one fused op, and Detectron2's optimizer groups exempt it from weight decay."""

import pytest
import torch
from detectron2.layers import get_norm
from detectron2.layers.batch_norm import LayerNorm
from detectron2.solver.build import get_default_optimizer_params

from hiera_det.modeling import channel_layer_norm


def pair(channels=6, eps=1e-6):
    torch.manual_seed(0)
    reference = LayerNorm(channels, eps=eps)
    reference.weight.data.normal_()
    reference.bias.data.normal_()
    ours = channel_layer_norm(eps=eps)(channels)
    ours.load_state_dict(reference.state_dict())  # the same keys and shapes
    return reference, ours


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (1, 6, 1, 1), (3, 6, 16, 2)])
def test_forward_and_gradients_match_detectron2(shape):
    reference, ours = pair(eps=1e-5)
    x = (torch.randn(shape) * 3 + 1).requires_grad_()
    y_ref, y = reference(x), ours(x)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(shape)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, reference.weight, reference.bias])
    grads = torch.autograd.grad((y * g).sum(), [x, ours.weight, ours.bias])
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_keeps_the_dtype_under_bf16_autocast_and_empty_batches():
    reference, ours = pair()
    x = torch.randn(2, 6, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x.bfloat16())
    assert y.dtype == torch.bfloat16  # Detectron2's LN returns fp32 here (fp32 weight * bf16)
    torch.testing.assert_close(y.float(), reference(x), rtol=0.05, atol=0.05)
    assert ours(torch.zeros(0, 6, 14, 14)).shape == (0, 6, 14, 14)  # RoI heads with no RoIs


def test_is_what_get_norm_builds_and_the_optimizer_exempts_from_decay():
    norm = get_norm(channel_layer_norm(eps=1e-5), 8)
    assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-5
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), norm)
    groups = get_default_optimizer_params(
        model, base_lr=1.0, weight_decay=0.1, weight_decay_norm=0.0
    )
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(norm.weight)] == decay_of[id(norm.bias)] == 0.0
    assert decay_of[id(model[0].weight)] == 0.1
