import functools
import json

import pytest
import torch
from torch import nn

from erde.errors import ErdeError
from erde.models import EarlyExitNet, ExitHead, create_model, list_models

# Product of each family's strides, from the architectures' definitions: the smallest input.
MIN_SIZE = {
    **{f"resnet{d}": 4 for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet18": 8,
    "resnet34": 8,
    **{name: 4 for name in ("wrn", "wrn16_4", "wrn16_8", "wrn28_10", "wrn40_2", "wrn40_4")},
    "mobilenetv2": 8,
    **{name: 32 for name in ("vgg11", "vgg13", "vgg16")},
}
# Intermediate exits of each model's documented default (block indices).
DEFAULT_EXITS = {
    "resnet8": [1, 2],
    "resnet14": [2, 4],
    "resnet20": [3, 6],
    "resnet32": [5, 10],
    "resnet44": [7, 14],
    "resnet56": [9, 18],
    "resnet110": [18, 36],
    "resnet18": [2, 4, 6],
    "resnet34": [3, 7, 13],
    "wrn": [2, 4],  # built below as WRN-16-2 to keep the test small
    "wrn16_4": [2, 4],
    "wrn16_8": [2, 4],
    "wrn28_10": [4, 8],
    "wrn40_2": [6, 12],
    "wrn40_4": [6, 12],
    "mobilenetv2": [3, 6, 13],
    "vgg11": [1, 2, 4, 6],
    "vgg13": [2, 4, 6, 8],
    "vgg16": [2, 4, 7, 10],
}
NUM_BLOCKS = {
    **{f"resnet{d}": (d - 2) // 2 for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet18": 8,
    "resnet34": 16,
    "wrn": 6,
    "wrn16_4": 6,
    "wrn16_8": 6,
    "wrn28_10": 12,
    "wrn40_2": 18,
    "wrn40_4": 18,
    "mobilenetv2": 17,
    "vgg11": 8,
    "vgg13": 10,
    "vgg16": 13,
}
OPTIONS = {"wrn": {"depth": 16, "widen_factor": 2}}


def test_every_family_is_registered():
    assert sorted(DEFAULT_EXITS) == list_models()


@functools.cache
def build(name, in_channels=3, input_size=32, num_classes=10):
    """Each big model is built once per module; tests must not modify what they get."""
    torch.manual_seed(0)
    return create_model(
        name,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        **OPTIONS.get(name, {}),
    )


def check_outputs(model, in_channels, input_size):
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, input_size, input_size))
    assert isinstance(logits, list)
    assert len(logits) == model.num_exits
    for out in logits:
        assert out.shape == (2, model.num_classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(DEFAULT_EXITS))
def test_rgb_32_every_exit_has_logits(name):
    model = build(name)
    assert isinstance(model, EarlyExitNet)
    assert model.num_blocks == NUM_BLOCKS[name]
    assert model.exit_blocks == [*DEFAULT_EXITS[name], NUM_BLOCKS[name]]
    assert model.num_exits == len(DEFAULT_EXITS[name]) + 1
    assert len(model.segments) == len(model.heads) == model.num_exits
    assert (model.num_classes, model.in_channels, model.input_size) == (10, 3, 32)
    check_outputs(model, 3, 32)


@pytest.mark.parametrize("name", sorted(DEFAULT_EXITS))
def test_one_channel_at_smallest_input(name):
    size = MIN_SIZE[name]
    check_outputs(build(name, in_channels=1, input_size=size), 1, size)


@pytest.mark.parametrize("name", ["resnet8", "resnet18", "wrn", "mobilenetv2", "vgg11"])
def test_input_below_the_strides_is_refused(name):
    size = MIN_SIZE[name]
    with pytest.raises(ErdeError, match=f"at least {size}x{size}"):
        create_model(name, input_size=size - 1, **OPTIONS.get(name, {}))


@pytest.mark.parametrize("name", ["resnet8", "resnet18", "wrn", "mobilenetv2", "vgg11"])
def test_num_classes_reaches_every_exit(name):
    # 7, not 10, so that a hard-coded class count would show.
    check_outputs(build(name, num_classes=7), 3, 32)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("resnet8", 8),
        ("resnet20", 9),
        ("wrn16_4", 12),
        ("resnet18", 24),
        ("mobilenetv2", 20),
        ("vgg11", 48),
    ],
)
def test_other_input_sizes(name, size):
    check_outputs(build(name, in_channels=3, input_size=size), 3, size)


def test_exit_head_is_the_papers():
    """The intermediate head docs/method.md defines under "Early-exit networks"."""
    model = build("resnet20")
    # Exit 1 sees 16 x 32 x 32 (stage 1), exit 2 sees 32 x 16 x 16; the 2x2 pool halves both.
    for head, (channels, size) in zip(model.heads[:2], [(16, 32), (32, 16)], strict=True):
        assert isinstance(head, ExitHead)
        assert [type(layer) for layer in head] == [
            nn.BatchNorm2d,
            nn.ReLU,
            nn.AvgPool2d,
            nn.Dropout,
            nn.Flatten,
            nn.Linear,
        ]
        assert head[0].num_features == channels
        assert head[3].p == 0.5
        assert head[5].in_features == channels * (size // 2) ** 2
        assert head[5].out_features == 10


def test_exit_head_skips_pooling_on_a_1x1_map():
    # At 4x4 input, stage 3 of ResNet-20 (blocks 7-9) runs at 1x1.
    model = create_model("resnet20", input_size=4, exits=[3, 7])
    head_1x1 = model.heads[1]
    assert not any(isinstance(layer, nn.AvgPool2d) for layer in head_1x1)
    assert head_1x1[-1].in_features == 64
    assert model.heads[0][-1].in_features == 16 * 2 * 2  # 4x4 map pooled to 2x2
    model.eval()
    assert [o.shape for o in model(torch.randn(2, 3, 4, 4))] == [(2, 10)] * 3


def test_final_exit_is_the_plain_network_wherever_the_exits_are():
    torch.manual_seed(0)
    plain = create_model("resnet20", exits=[])
    exited = create_model("resnet20", exits=[1, 4, 5, 8])
    assert plain.num_exits == 1 and exited.num_exits == 5
    # Same backbone tensors in the same order, only cut differently.
    for dst, src in zip(
        [*exited.segments.parameters(), *exited.segments.buffers(), *exited.heads[-1].parameters()],
        [*plain.segments.parameters(), *plain.segments.buffers(), *plain.heads[-1].parameters()],
        strict=True,
    ):
        dst.data.copy_(src.data)
    plain.eval()
    exited.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(exited(x)[-1], plain(x)[0], atol=1e-5)


# --- exits specifications (ResNet-20: 9 blocks in stages ending at 3, 6, 9) ---


@pytest.mark.parametrize(
    ("spec", "blocks"),
    [
        (None, [3, 6, 9]),
        ("default", [3, 6, 9]),
        (" Default ", [3, 6, 9]),
        ("stages", [3, 6, 9]),
        ("every:1", [1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ("every:2", [2, 4, 6, 8, 9]),
        ("every:4", [4, 8, 9]),
        ("every:8", [8, 9]),
        ([4], [4, 9]),
        ([8, 2], [2, 8, 9]),
        ((1, 5), [1, 5, 9]),
        ("3,6", [3, 6, 9]),
        (" 2 , 5 ", [2, 5, 9]),
        ("7", [7, 9]),
        ([], [9]),
    ],
)
def test_exit_specs(spec, blocks):
    model = create_model("resnet20", exits=spec)
    assert model.exit_blocks == blocks
    assert model.num_exits == len(blocks)


def test_stages_and_default_differ_where_documented():
    assert create_model("resnet18", exits="stages").exit_blocks == [2, 4, 6, 8]
    mobilenet = create_model("mobilenetv2", exits="stages")
    assert mobilenet.exit_blocks == [1, 3, 6, 10, 13, 16, 17]
    assert create_model("vgg11", exits="every:3").exit_blocks == [3, 6, 8]


@pytest.mark.parametrize(
    "spec",
    [
        [0],
        [9],
        [10],
        [-1],
        [3, 3],
        [2.5],
        ["3"],
        [True],
        "0,3",
        "3,,6",
        "3;6",
        "9",
        "foo",
        "every:",
        "every:0",
        "every:-1",
        "every:9",
        "every:x",
        "stage",
        3,
        {"a": 1},
        b"3",
    ],
)
def test_bad_exit_specs_name_the_valid_range(spec):
    with pytest.raises(ErdeError) as info:
        create_model("resnet20", exits=spec)
    if spec != [3, 3]:
        assert "1..8" in str(info.value)


def test_duplicate_exits_are_refused():
    with pytest.raises(ErdeError, match="duplicates"):
        create_model("resnet20", exits="4,4")


# --- the arch record and user mistakes ---


def test_arch_rebuilds_the_same_model():
    torch.manual_seed(1)
    model = create_model(
        "wrn",
        num_classes=5,
        in_channels=1,
        exits="every:1",
        input_size=12,
        depth=10,
        widen_factor=2,
        dropout=0.3,
    )
    assert model.arch == {
        "name": "wrn",
        "num_classes": 5,
        "in_channels": 1,
        "exits": [1, 2],
        "input_size": 12,
        "depth": 10,
        "widen_factor": 2,
        "dropout": 0.3,
    }
    arch = json.loads(json.dumps(model.arch))  # checkpoint sidecars store it as JSON
    twin = create_model(**arch)
    assert twin.arch == model.arch
    twin.load_state_dict(model.state_dict())  # strict: same modules, same shapes
    model.eval()
    twin.eval()
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        for a, b in zip(model(x), twin(x), strict=True):
            assert torch.equal(a, b)


def test_arch_of_every_default_build_round_trips():
    for name in ("resnet8", "mobilenetv2", "vgg11"):
        model = build(name)
        twin = create_model(**model.arch)
        assert twin.exit_blocks == model.exit_blocks
        assert {k: v.shape for k, v in twin.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()
        }


def test_model_names_are_case_insensitive():
    assert create_model(" ResNet8 ").arch["name"] == "resnet8"


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ErdeError, match=r"unknown model 'resnet21'.*resnet20.*wrn28_10"):
        create_model("resnet21")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": "10"}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
        ({"input_size": 0}, "input_size"),
        ({"width": 2}, "no option"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ErdeError, match=message):
        create_model("resnet20", **kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"depth": 12}, {"depth": 4}, {"widen_factor": 0}, {"dropout": 1.0}]
)
def test_bad_wrn_options(kwargs):
    with pytest.raises(ErdeError, match="WRN"):
        create_model("wrn", **kwargs)


def test_mobilenetv2_width_multiplier():
    half = create_model("mobilenetv2", width_mult=0.5)
    # torchvision's rounding: 32 * 0.5 = 16 stem channels, last conv stays 1280 below 1.0.
    assert half.segments[0][0][0].out_channels == 16
    assert half.heads[-1][-1].in_features == 1280
    with pytest.raises(ErdeError, match="width_mult"):
        create_model("mobilenetv2", width_mult=0)


# --- parameter counts: the architectures are the published ones ---

# Backbone parameters (no intermediate heads) with 10 classes. Literature, rounded as published:
# He et al. 2016 Table 6 (ResNet-20 0.27M, -56 0.85M, -110 1.7M; option A), the common
# CIFAR ResNet-18/34 ports (11.17M, 21.28M), Zagoruyko & Komodakis 2016 (WRN-28-10 36.5M,
# WRN-40-2 2.2M; exact 36,479,194 and 2,243,546 in imgclsmob), chenyaofo/pytorch-cifar-models
# (MobileNetV2 2.24M, VGG-16-BN 15.25M, VGG-11-BN 9.76M).
PARAMS = {
    "resnet20": 269_722,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "wrn28_10": 36_479_194,
    "wrn40_2": 2_243_546,
    "mobilenetv2": 2_236_682,
    "vgg11": 9_756_426,
    "vgg16": 15_253_578,
}
PUBLISHED_M = {
    "resnet20": 0.27,
    "resnet56": 0.85,
    "resnet110": 1.7,
    "resnet18": 11.17,
    "resnet34": 21.28,
    "wrn28_10": 36.5,
    "wrn40_2": 2.2,
    "mobilenetv2": 2.24,
    "vgg11": 9.76,
    "vgg16": 15.25,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_backbone_parameter_counts(name):
    model = build(name)
    count = sum(p.numel() for p in [*model.segments.parameters(), *model.heads[-1].parameters()])
    assert count == PARAMS[name]
    digits = len(str(PUBLISHED_M[name]).split(".")[1])
    assert round(count / 1e6, digits) == PUBLISHED_M[name]


@pytest.mark.parametrize("width_mult", [0.5, 1.0, 1.4])
def test_mobilenetv2_parameters_match_torchvision(width_mult):
    # Strides do not change parameters, so erde's CIFAR variant (exit heads aside) must hold
    # exactly torchvision's ImageNet MobileNetV2's parameter tensors, in the same order.
    from torchvision.models import mobilenet_v2

    model = create_model("mobilenetv2", width_mult=width_mult)
    ours = [*model.segments.parameters(), *model.heads[-1].parameters()]
    reference = list(mobilenet_v2(num_classes=10, width_mult=width_mult).parameters())
    assert [p.shape for p in ours] == [p.shape for p in reference]
