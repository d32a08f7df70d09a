"""`Hiera(compile=...)`: the opt-in torch.compile switch gives the eager model's numbers.

The wiring is checked with torch.compile's "eager" and "aot_eager" backends (Dynamo tracing, and
AOTAutograd's forward/backward graphs, without code generation: seconds); one test compiles a tiny
model with the default backend (Inductor, C++ code generation: about half a minute here).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ROOT

from hiera_det.config_check import load_config
from hiera_det.mae.model import build_mae
from hiera_det.modeling.hiera import Hiera

TINY = dict(embed_dim=8, num_heads=1, stages=(1, 1, 2, 1), use_sdpa=True)


def _pair(**compile_kwargs) -> tuple[Hiera, Hiera]:
    torch.manual_seed(0)
    eager = Hiera(**TINY).eval()
    compiled = Hiera(**TINY, compile=compile_kwargs or True).eval()
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def test_compiled_trunk_matches_eager_with_traced_graph():
    torch._dynamo.reset()
    eager, compiled = _pair(backend="eager")
    images = torch.randn(2, 3, 64, 96)
    want, got = eager(images), compiled(images)
    assert list(got) == list(want) == ["res2", "res3", "res4", "res5"]
    for name in want:
        assert got[name].shape == want[name].shape
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    assert "_compiled_blocks" in compiled.__dict__  # the compiled path ran, not the eager one


def test_compiled_training_step_matches_eager_gradients():
    """MAE training through the compiled encoder: same loss and gradients (AOTAutograd graphs)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_mae("tiny", decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2)
    compiled = build_mae(
        "tiny", decoder_depth=1, decoder_embed_dim=32, decoder_num_heads=2,
        compile={"backend": "aot_eager"},
    )  # fmt: skip
    compiled.load_state_dict(eager.state_dict())
    images = torch.randn(2, 3, 224, 224)
    visible = eager.random_visible(2, (7, 7))
    losses = [model.reconstruct(images, visible)[0] for model in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_inductor_compiled_trunk_matches_eager():
    torch._dynamo.reset()
    eager, compiled = _pair()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want, got = eager(images), compiled(images)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_compiled_trunk_deepcopies_and_pickles_without_the_compiled_function():
    torch._dynamo.reset()
    _, compiled = _pair(backend="eager")
    compiled(torch.randn(1, 3, 64, 64))
    copied = copy.deepcopy(compiled)
    assert "_compiled_blocks" not in copied.__dict__
    torch.testing.assert_close(copied(torch.ones(1, 3, 64, 64)), compiled(torch.ones(1, 3, 64, 64)))


@pytest.mark.parametrize(
    "value, message",
    [({"mdoe": "max-autotune"}, "unknown torch.compile argument(s) ['mdoe']"), ("yes", "'yes'")],
)
def test_bad_compile_argument_is_named(value, message):
    with pytest.raises(ValueError, match="compile=") as err:
        Hiera(**TINY, compile=value)
    assert message in str(err.value)


def test_config_switch_reaches_the_trunk():
    """`model.backbone.bottom_up.compile=...` is a checked override; it builds a compiling trunk."""
    from detectron2.config import instantiate

    config = str(ROOT / "configs/mask_rcnn_hiera_t.py")
    cfg = load_config(config, ["model.backbone.bottom_up.compile={mode:max-autotune}"])
    trunk = instantiate(cfg.model.backbone.bottom_up)
    assert trunk._compile_options == {"mode": "max-autotune"}
    default = instantiate(load_config(config, []).model.backbone.bottom_up)
    assert default._compile_options is None
