"""The MAE model (hiera_det.mae.model): parity with the official model, masking invariants."""

import copy

import pytest
import torch

from hiera_det.checkpoint import convert_mae_checkpoint
from hiera_det.mae.model import MaskedAutoencoderHiera, build_mae
from hiera_det.modeling import Hiera

pytestmark = pytest.mark.usefixtures("single_thread")


# A small MAE both implementations can build: 128 px = 4x4 mask units, decoder 2 blocks wide 32.
TINY_ENCODER = dict(embed_dim=16, num_heads=1, stages=(1, 1, 2, 1))
TINY_DECODER = dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)


def tiny_pair(hiera_mae, seed: int = 0):
    """(official, ours) with the same weights, loaded into ours through the converter;
    `hiera_mae` is the official MAE module (the `official_mae` fixture)."""
    torch.manual_seed(seed)
    ref = hiera_mae.MaskedAutoencoderHiera(
        input_size=(128, 128), q_pool=2, **TINY_ENCODER, **TINY_DECODER
    )
    ours = build_mae("tiny", pretrain_img_size=128, **TINY_ENCODER, **TINY_DECODER)
    ours.load_state_dict(convert_mae_checkpoint({"model_state": ref.state_dict()}), strict=True)
    return ref, ours


def tiny_mae(**kw) -> MaskedAutoencoderHiera:
    torch.manual_seed(0)
    return build_mae("tiny", pretrain_img_size=128, **TINY_ENCODER, **{**TINY_DECODER, **kw})


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / b.abs()).item()


# --- parity with the official implementation ----------------------------------------------------


def test_hiera_t_224_matches_official_mae_loss_and_prediction(official_mae):
    torch.manual_seed(0)
    ref = official_mae.mae_hiera_tiny_224(pretrained=False).eval()
    ours = build_mae("tiny").eval()
    assert ours.decoder_pos_embed.shape == ref.decoder_pos_embed.shape == (1, 196, 512)
    ours.load_state_dict(convert_mae_checkpoint({"model_state": ref.state_dict()}), strict=True)
    x = torch.randn(2, 3, 224, 224)
    visible = ours.random_visible(2, (7, 7))
    assert visible.sum(dim=1).tolist() == [19, 19]  # int(49 * 0.4)
    with torch.no_grad():
        loss_ref, pred_ref, label_ref, _ = ref(x, mask=visible)
        loss, pred, _ = ours.reconstruct(x, visible)
    assert relative(loss, loss_ref) <= 1e-5
    masked = ~ours.visible_per_patch(visible, (7, 7))
    assert pred.shape == (2, 196, 16 * 16 * 3)
    torch.testing.assert_close(pred[masked], pred_ref, atol=1e-4, rtol=1e-4)


def test_tiny_matches_official_loss_and_gradients_in_training_mode(official_mae):
    ref, ours = tiny_pair(official_mae)
    x = torch.randn(3, 3, 128, 128)
    visible = ours.random_visible(3, (4, 4))
    loss_ref = ref(x, mask=visible)[0]
    loss = ours.reconstruct(x, visible)[0]
    assert relative(loss, loss_ref) <= 1e-5
    loss_ref.backward()
    loss.backward()
    ours_params = dict(ours.named_parameters())
    for key, p_ref in convert_mae_checkpoint(dict(ref.named_parameters())).items():
        g, g_ref = ours_params[key].grad, p_ref.grad
        assert g is not None, key
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-4, msg=key)


def test_random_masks_equal_official_for_the_same_seed(official_mae):
    ref, ours = tiny_pair(official_mae)
    x = torch.zeros(4, 3, 128, 128)
    torch.manual_seed(7)
    expected = ref.get_random_mask(x, 0.6)
    torch.manual_seed(7)
    assert torch.equal(ours.random_visible(4, (4, 4)), expected)


def test_official_checkpoint_keys_map_one_to_one(official_mae):
    ref, ours = tiny_pair(official_mae)
    converted = convert_mae_checkpoint({"model_state": ref.state_dict()})
    assert set(converted) == set(ours.state_dict())
    assert "encoder.blocks.0.attn.qkv.weight" in converted and "mask_token" in converted
    assert "multi_scale_fusion_heads.1.weight" in converted


# --- masking invariants ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ratio,grid,keep", [(0.6, (7, 7), 19), (0.75, (4, 4), 4), (0.0, (2, 3), 6)]
)
def test_random_visible_keeps_the_official_count_per_image(ratio, grid, keep):
    model = tiny_mae(mask_ratio=ratio)
    visible = model.random_visible(8, grid)
    assert visible.dtype == torch.bool and visible.shape == (8, grid[0] * grid[1])
    assert visible.sum(dim=1).tolist() == [keep] * 8
    if 0 < keep < visible.shape[1]:
        assert len({tuple(v.tolist()) for v in visible}) > 1  # per-image masks differ


def test_masked_pixels_do_not_reach_the_encoder_and_visible_ones_do():
    model = tiny_mae().eval()
    x = torch.randn(2, 3, 128, 128)
    visible = torch.zeros(2, 16, dtype=torch.bool)
    visible[:, [0, 5, 9, 15]] = True  # 4 of the 4x4 units, row-major
    masked_unit, visible_unit = (1, 2), (1, 1)  # unit indices 6 (masked) and 5 (visible)
    with torch.no_grad():
        keep = model.kept_units(visible, (4, 4))
        base = model.forward_encoder(x, keep)
        for (uy, ux), should_change in ((masked_unit, False), (visible_unit, True)):
            y = x.clone()
            y[:, :, uy * 32 : (uy + 1) * 32, ux * 32 : (ux + 1) * 32] += 5.0
            changed = not torch.equal(
                model.forward_encoder(y, model.kept_units(visible, (4, 4))), base
            )
            assert changed == should_change, (uy, ux)
    assert base.shape == (2, 4, 2, 2, 128)


def test_loss_counts_masked_patches_only_against_normalised_pixels():
    model = tiny_mae()
    x = torch.randn(2, 3, 128, 128)
    visible = model.random_visible(2, (4, 4))
    pred = torch.randn(2, 64, 16 * 16 * 3)
    patch_visible = model.visible_per_patch(visible, (4, 4))
    keep = model.kept_units(visible, (4, 4))
    assert patch_visible.sum(dim=1).tolist() == [4 * 6, 4 * 6]  # 6 visible units of 2x2 patches
    loss = model.forward_loss(x, pred, keep)

    other = pred.clone()
    other[patch_visible] += 10.0  # predictions of visible patches do not count
    assert torch.equal(model.forward_loss(x, other, keep), loss)
    other = pred.clone()
    other[~patch_visible] += 10.0
    assert model.forward_loss(x, other, keep) > loss

    target = model.patchify(x)[~patch_visible]
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(loss, (pred[~patch_visible] - target).pow(2).mean())


def test_patchify_is_channel_major_and_unpatchify_inverts_it():
    model = tiny_mae()
    x = torch.randn(2, 3, 64, 96)
    patches = model.patchify(x)
    assert patches.shape == (2, 4 * 6, 3 * 16 * 16)
    torch.testing.assert_close(patches[0, 1, :256], x[0, 0, :16, 16:32].reshape(-1))
    assert torch.equal(model.unpatchify(patches, (64, 96)), x)


def test_explicit_visible_must_keep_the_same_count_per_image():
    model = tiny_mae()
    visible = torch.zeros(2, 16, dtype=torch.bool)
    visible[0, :4] = True
    visible[1, :5] = True
    with pytest.raises(ValueError, match="same number of visible units"):
        model.reconstruct(torch.randn(2, 3, 128, 128), visible)


# --- training contract --------------------------------------------------------------------------


def test_forward_returns_a_loss_dict_and_every_parameter_gets_a_gradient():
    model = tiny_mae().train()
    losses = model(torch.randn(2, 3, 128, 128))
    assert list(losses) == ["loss_mae"] and torch.isfinite(losses["loss_mae"])
    losses["loss_mae"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


def test_dense_visibility_runs_the_encoder_on_every_unit():
    model = tiny_mae().eval()
    x = torch.randn(1, 3, 128, 128)
    dense = torch.arange(16).view(1, 16)  # every unit kept
    with torch.no_grad():
        latent = model.forward_encoder(x, dense)
        pred = model.forward_decoder(latent, dense, (4, 4))
        loss = model.forward_loss(x, pred, model.random_keep(1, (4, 4)))
    assert latent.shape == (1, 16, 2, 2, 128) and pred.shape == (1, 64, 768)
    assert torch.isfinite(loss)


def test_encoder_must_output_every_stage():
    encoder = Hiera(**TINY_ENCODER, q_pool=2, out_features=("res2", "res3", "res5"))
    with pytest.raises(ValueError, match="every encoder stage"):
        MaskedAutoencoderHiera(encoder)


# --- the whole training step, compiled (compile_step) ------------------------------------------


def test_the_training_step_traces_as_one_graph_without_host_synchronisation():
    """`masked_loss` (encoder, decoder, loss) has static shapes: Dynamo traces it whole."""
    model = tiny_mae()
    images = torch.randn(2, 3, 128, 128)
    keep = model.random_keep(2, (4, 4))
    explanation = torch._dynamo.explain(model.masked_loss)(images, keep)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_step_gives_the_eager_loss_and_gradients(backend):
    """fullgraph=True compiles; forward and backward equal eager within fp32 noise, for two
    steps with other images and masks (the compiled step reads its inputs anew)."""
    torch._dynamo.reset()
    eager = tiny_mae()
    compiled = tiny_mae(compile_step={"backend": backend})
    compiled.load_state_dict(eager.state_dict())
    for seed in (1, 2):
        torch.manual_seed(seed)
        images, keep = torch.randn(2, 3, 128, 128), eager.random_keep(2, (4, 4))
        visible = eager.unit_weights(keep, (4, 4)).bool()
        for model in (eager, compiled):
            model.zero_grad()
            model.reconstruct(images, visible)[0].backward()
        want, got = eager.reconstruct(images, visible), compiled.reconstruct(images, visible)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert "_compiled_step" in compiled.__dict__  # the compiled path ran
    copied = copy.deepcopy(compiled)
    assert "_compiled_step" not in copied.__dict__  # a copy compiles anew
    torch._dynamo.reset()


def test_static_input_buffers_are_refreshed_in_place_each_step():
    """The CUDA-graph pattern (mode="reduce-overhead"): one pair of persistent buffers, the
    step's inputs copied into them, new buffers only for new shapes."""
    model = tiny_mae()
    a, keep_a = torch.randn(2, 3, 128, 128), model.random_keep(2, (4, 4))
    b, keep_b = torch.randn(2, 3, 128, 128), model.random_keep(2, (4, 4))
    first = model._static_inputs(a, keep_a)
    second = model._static_inputs(b, keep_b)
    assert first[0] is second[0] and first[1] is second[1]
    assert torch.equal(second[0], b) and torch.equal(second[1], keep_b)
    third = model._static_inputs(torch.randn(1, 3, 128, 128), keep_a[:1])
    assert third[0] is not first[0] and third[0].shape == (1, 3, 128, 128)


def test_bad_compile_step_argument_is_named():
    with pytest.raises(ValueError, match=r"compile=\{'mdoe'.*unknown torch.compile argument"):
        tiny_mae(compile_step={"mdoe": "max-autotune"})
