"""ConvNormRPNHead: StandardRPNHead plus a norm after each hidden conv."""

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import StandardRPNHead, build_rpn_head

from hiera_det.modeling import ConvNormRPNHead

pytestmark = pytest.mark.usefixtures("single_thread")


def features(channels=16, sizes=(32, 16, 8)):
    torch.manual_seed(0)
    return [torch.randn(2, channels, s, s) for s in sizes]


def test_without_norm_it_is_the_standard_head():
    ours = ConvNormRPNHead(in_channels=16, num_anchors=3, conv_dims=[-1, -1], conv_norm="")
    stock = StandardRPNHead(in_channels=16, num_anchors=3, conv_dims=[-1, -1])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in stock.state_dict().items()
    }
    ours.load_state_dict(stock.state_dict())
    for a, b in zip(ours(features()), stock(features())):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)


def test_layer_norm_after_each_hidden_conv():
    head = ConvNormRPNHead(in_channels=16, num_anchors=3)  # defaults: two convs, "LN"
    assert [n for n, _ in head.conv.named_children()] == ["conv0", "conv1"]
    normed = []
    for conv in head.conv:
        conv.norm.register_forward_hook(lambda m, i, o: normed.append(o))
    logits, deltas = head(features())
    assert [x.shape for x in logits] == [(2, 3, s, s) for s in (32, 16, 8)]
    assert [x.shape for x in deltas] == [(2, 12, s, s) for s in (32, 16, 8)]
    assert len(normed) == 2 * 3  # two norms, three levels
    for out in normed:  # LayerNorm over channels at each position (weight 1, bias 0 at init)
        torch.testing.assert_close(out.mean(1), torch.zeros_like(out[:, 0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            out.var(1, unbiased=False), torch.ones_like(out[:, 0]), atol=1e-3, rtol=0
        )


def test_every_parameter_gets_a_gradient():
    head = ConvNormRPNHead(in_channels=16, num_anchors=3)
    logits, deltas = head(features())
    sum(x.square().sum() for x in logits + deltas).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_builds_from_a_yacs_config():
    cfg = get_cfg()
    cfg.MODEL.RPN.HEAD_NAME = "ConvNormRPNHead"
    cfg.MODEL.RPN.CONV_DIMS = [-1, -1]
    head = build_rpn_head(cfg, [ShapeSpec(channels=16, stride=s) for s in (4, 8, 16, 32, 64)])
    assert isinstance(head, ConvNormRPNHead)
    assert head.conv.conv1.norm is not None
