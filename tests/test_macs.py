import functools
import itertools
import math

import pytest
import torch

from erde.models import create_model, list_models
from erde.models.macs import exit_macs, macs_table, static_macs

# Hand counts: one MAC per multiply-accumulate of a conv or linear layer, nothing else.


def conv(k, cin, cout, hw):
    """MACs of a k x k convolution (groups=1) that outputs an hw x hw map."""
    return k * k * cin * cout * hw * hw


# ResNet-20, option A shortcuts (no parameters, no MACs), written out layer by layer.
RESNET20_STAGE1 = conv(3, 3, 16, 32) + 6 * conv(3, 16, 16, 32)  # stem + 3 blocks x 2 convs
RESNET20_STAGE2 = conv(3, 16, 32, 16) + 5 * conv(3, 32, 32, 16)
RESNET20_STAGE3 = conv(3, 32, 64, 8) + 5 * conv(3, 64, 64, 8)
RESNET20_FC = 64 * 10
RESNET20 = RESNET20_STAGE1 + RESNET20_STAGE2 + RESNET20_STAGE3 + RESNET20_FC
# The exit heads after stages 1 and 2 (docs/method.md, "Early-exit networks"): 2x2 average pool,
# then one linear layer.
RESNET20_HEADS = [16 * 16 * 16 * 10, 32 * 8 * 8 * 10]


def cifar_resnet(n, in_channels=3, size=32, classes=10):
    s2, s3 = math.ceil(size / 2), math.ceil(size / 4)
    return (
        conv(3, in_channels, 16, size)
        + 2 * n * conv(3, 16, 16, size)
        + conv(3, 16, 32, s2)
        + (2 * n - 1) * conv(3, 32, 32, s2)
        + conv(3, 32, 64, s3)
        + (2 * n - 1) * conv(3, 64, 64, s3)
        + 64 * classes
    )


def resnet_projection(blocks_per_stage, classes=10):
    """CIFAR ResNet-18/34: 64-channel 3x3 stem, basic blocks, 1x1 projection shortcuts."""
    total, cin = conv(3, 3, 64, 32), 64
    for stage, blocks in enumerate(blocks_per_stage):
        width, hw = 64 * 2**stage, 32 // 2**stage
        total += conv(3, cin, width, hw) + (2 * blocks - 1) * conv(3, width, width, hw)
        if cin != width:
            total += conv(1, cin, width, hw)
        cin = width
    return total + cin * classes


def wide_resnet(depth, k, classes=10):
    n = (depth - 4) // 6
    total, cin = conv(3, 3, 16, 32), 16
    for width, hw in ((16 * k, 32), (32 * k, 16), (64 * k, 8)):
        total += conv(3, cin, width, hw) + (2 * n - 1) * conv(3, width, width, hw)
        if cin != width:
            total += conv(1, cin, width, hw)  # shortcut projection
        cin = width
    return total + cin * classes


def vgg(cfg, classes=10):
    """`cfg`: conv widths, M for a 2x2 max pool."""
    total, cin, hw = 0, 3, 32
    for v in cfg.split():
        if v == "M":
            hw //= 2
        else:
            total, cin = total + conv(3, cin, int(v), hw), int(v)
    return total + 512 * 512 + 512 * 512 + 512 * classes  # 3-layer MLP classifier


def mobilenetv2(classes=10):
    settings = [
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]
    total, cin, hw = conv(3, 3, 32, 32), 32, 32
    for t, c, n, s in settings:
        for i in range(n):
            out_hw = hw // (s if i == 0 else 1)
            hidden = cin * t
            if t != 1:
                total += hidden * cin * hw * hw  # 1x1 expansion
            total += 9 * hidden * out_hw * out_hw  # 3x3 depthwise: 9 MACs per output
            total += hidden * c * out_hw * out_hw  # 1x1 projection
            cin, hw = c, out_hw
    return total + cin * 1280 * hw * hw + 1280 * classes  # 1x1 conv to 1280, linear


@functools.cache
def build(name, **kwargs):
    torch.manual_seed(0)
    return create_model(name, **kwargs)


def test_resnet20_by_hand():
    model = build("resnet20")
    assert static_macs(model) == RESNET20 == 40_551_040
    rows = macs_table(model)
    assert [r["segment_macs"] for r in rows] == [RESNET20_STAGE1, RESNET20_STAGE2, RESNET20_STAGE3]
    assert [r["head_macs"] for r in rows] == [*RESNET20_HEADS, RESNET20_FC]
    assert [r["exit"] for r in rows] == [1, 2, 3]
    assert [r["block"] for r in rows] == [3, 6, 9]
    first = RESNET20_STAGE1 + RESNET20_HEADS[0]
    second = first + RESNET20_STAGE2 + RESNET20_HEADS[1]
    assert exit_macs(model) == [first, second, RESNET20 + sum(RESNET20_HEADS)]
    assert [r["cumulative_macs"] for r in rows] == exit_macs(model)
    assert rows[0]["percent_of_full"] == pytest.approx(100 * first / (RESNET20 + 61_440))
    assert rows[-1]["percent_of_full"] == 100.0


def test_counts_follow_input_size_and_channels():
    model = build("resnet20", in_channels=1, input_size=8)
    assert static_macs(model) == cifar_resnet(3, in_channels=1, size=8)
    # 8x8 input: the stage-1 map is 8x8, pooled to 4x4 in the first head.
    assert macs_table(model)[0]["head_macs"] == 16 * 4 * 4 * 10


def test_head_without_pooling_counts_its_linear_layer():
    model = build("resnet20", input_size=4, exits=(7,))
    assert macs_table(model)[0]["head_macs"] == 64 * 1 * 1 * 10


# Published MAC counts (conv + linear), at the precision they were published with:
#   ResNet-56 125.49M, ResNet-110 252.89M: HRank (Lin et al. 2020) and KDFS baselines, option A.
#   ResNet-20/-56 40.81M/125.75M: chenyaofo/pytorch-cifar-models, option-B ports, which add two
#     1x1 projections: 16*32*16*16 + 32*64*8*8 = 262,144 MACs.
#   ResNet-18 0.56G, ResNet-34 1.16G: CIFAR ports (e.g. da2so/DA2Lite model zoo).
#   VGG-11/13/16-BN 153.29M/228.79M/313.73M, MobileNetV2 87.98M: chenyaofo/pytorch-cifar-models
#     (VGG-16-BN 313.73M also in HRank).
#   WRN-28-10 5,246.98M in osmr/imgclsmob, whose counter adds a little beyond conv + linear.
OPTION_B_EXTRA = conv(1, 16, 32, 16) + conv(1, 32, 64, 8)


@pytest.mark.parametrize(
    ("name", "hand", "published_m", "digits"),
    [
        ("resnet20", cifar_resnet(3), 40.81, 2),
        ("resnet56", cifar_resnet(9), 125.49, 2),
        ("resnet110", cifar_resnet(18), 252.89, 2),
        ("resnet18", resnet_projection((2, 2, 2, 2)), 560, -1),
        ("resnet34", resnet_projection((3, 4, 6, 3)), 1160, -1),
        ("vgg11", vgg("64 M 128 M 256 256 M 512 512 M 512 512 M"), 153.29, 2),
        ("vgg13", vgg("64 64 M 128 128 M 256 256 M 512 512 M 512 512 M"), 228.79, 2),
        ("vgg16", vgg("64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M"), 313.73, 2),
        ("mobilenetv2", mobilenetv2(), 87.98, 2),
    ],
)
def test_backbone_macs_match_hand_count_and_literature(name, hand, published_m, digits):
    macs = static_macs(build(name))
    assert macs == hand
    if name == "resnet20":
        macs += OPTION_B_EXTRA  # the published figure is for option B
    assert round(macs / 1e6, digits) == published_m


def test_resnet56_with_projection_shortcuts_matches_option_b_figure():
    # erde's ResNet-56 with its two zero-padding shortcuts swapped for the 1x1 conv + BN
    # projections of option-B ports: erde.models.macs must count them and reach that published
    # figure.
    model = create_model("resnet56")
    blocks = [m for m in model.modules() if getattr(m, "downsample", None) is not None]
    assert len(blocks) == 2
    for block in blocks:
        cin, cout = block.conv1.in_channels, block.conv1.out_channels
        block.downsample = torch.nn.Sequential(
            torch.nn.Conv2d(cin, cout, 1, stride=block.conv1.stride, bias=False),
            torch.nn.BatchNorm2d(cout),
        )
    macs = static_macs(model)
    assert macs == cifar_resnet(9) + OPTION_B_EXTRA
    assert round(macs / 1e6, 2) == 125.75


@pytest.mark.parametrize(("name", "depth", "k"), [("wrn16_4", 16, 4), ("wrn40_2", 40, 2)])
def test_small_wrn_by_hand(name, depth, k):
    assert static_macs(build(name)) == wide_resnet(depth, k)


def test_wrn28_10_by_hand_and_literature():
    macs = static_macs(build("wrn28_10"))
    assert macs == wide_resnet(28, 10) == 5_243_328_768
    assert abs(macs / 5_246.98e6 - 1) < 1e-3


@pytest.mark.parametrize("name", list_models())
def test_cumulative_macs_add_up(name):
    model = build(name, **({"depth": 10, "widen_factor": 1} if name == "wrn" else {}))
    rows = macs_table(model)
    cumulative = [r["cumulative_macs"] for r in rows]
    assert all(b > a for a, b in itertools.pairwise(cumulative))
    intermediate_heads = sum(r["head_macs"] for r in rows[:-1])
    assert cumulative[-1] == static_macs(model) + intermediate_heads
    assert all(r["segment_macs"] > 0 and r["head_macs"] > 0 for r in rows)
    assert rows[-1]["percent_of_full"] == 100.0


def test_counting_leaves_modes_and_weights_alone():
    model = create_model("resnet20", exits=[2, 5])
    model.train()
    model.heads[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exit_macs(model)
    static_macs(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
