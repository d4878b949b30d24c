"""`model.head`: the paper's exit head, or the same on the globally pooled map (issue 24, 5)."""

import pytest
import torch

from erde.config.schema import ModelConfig, records
from erde.models import create_model
from erde.models.early_exit import HEADS
from erde.models.macs import exit_macs


def test_the_config_offers_the_heads_the_models_build():
    assert records()["model.head"].choices == HEADS  # the schema repeats the names, a layer below


def test_a_pool_head_is_bn_relu_global_mean_and_one_linear_layer():
    torch.manual_seed(0)
    net = create_model("resnet8", num_classes=10, input_size=32, head="pool").eval()
    paper = create_model("resnet8", num_classes=10, input_size=32)
    assert net.arch["head"] == "pool" and "head" not in paper.arch  # older runs' arch unchanged
    head = net.heads[0]
    x = torch.randn(5, 16, 32, 32)  # resnet8's first stage: 16 channels at 32 x 32
    bn, linear = head[0], head[-1]
    expected = (
        torch.relu(
            (x - bn.running_mean[:, None, None])
            / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
            * bn.weight[:, None, None]
            + bn.bias[:, None, None]
        ).mean(dim=(2, 3))
        @ linear.weight.T
        + linear.bias
    )
    torch.testing.assert_close(head(x), expected)
    # weights: BN (2 x 16) + linear (16 x 10 + 10), against the paper's 2x2-pooled map's 4096 x 10
    assert sum(p.numel() for p in head.parameters()) == 2 * 16 + 16 * 10 + 10
    assert sum(p.numel() for p in paper.heads[0].parameters()) == 2 * 16 + 16 * 16 * 16 * 10 + 10
    assert exit_macs(net)[0] < exit_macs(paper)[0]
    assert exit_macs(net)[-1] < exit_macs(paper)[-1]  # every later exit counts the heads before
    # the final head is the network's own in both
    assert sum(p.numel() for p in net.heads[-1].parameters()) == sum(
        p.numel() for p in paper.heads[-1].parameters()
    )


def test_a_pool_head_rebuilds_from_its_arch():
    net = create_model("resnet8", num_classes=4, input_size=16, head="pool")
    again = create_model(**net.arch)
    assert [type(m) for m in again.heads[0]] == [type(m) for m in net.heads[0]]


def test_an_unknown_head_is_one_line():
    with pytest.raises(Exception, match=r"model.head='big' is not a head; choose paper or pool"):
        create_model("resnet8", head="big")
    assert ModelConfig().head == "paper"  # the paper's head stays the default
