"""Exits on timm and torchvision networks: small variants at small sizes, the last exit equal
to the library's own network, MACs equal to torchvision's published figures, weights kept."""

import os
import subprocess
import sys

import pytest
import torch

from erde.errors import ErdeError
from erde.models import create_model
from erde.models.macs import exit_macs, static_macs

pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# Small members of every family erde cuts, at sizes that keep the test fast.
FAMILIES = {
    "timm/test_resnet": 64,
    "timm/test_efficientnet": 64,
    "timm/mobilenetv3_small_050": 64,
    "timm/test_convnext": 64,
    "timm/regnetx_002": 64,
    "timm/test_vit": 32,
    "torchvision/resnet18": 64,
    "torchvision/mobilenet_v2": 64,
    "torchvision/mobilenet_v3_small": 64,
    "torchvision/efficientnet_b0": 64,
    "torchvision/regnet_x_400mf": 64,
    "torchvision/convnext_tiny": 64,
    "torchvision/vit_b_16": 32,
}


def plain_network(net):
    """The library's network from the model's own modules: what the pieces were cut from."""
    return net.segments, net.heads[-1]


@pytest.mark.parametrize("name", FAMILIES)
def test_last_exit_is_the_library_network(name):
    torch.manual_seed(0)
    net = create_model(name, num_classes=7, input_size=FAMILIES[name]).eval()
    x = torch.randn(2, 3, net.input_size, net.input_size)
    with torch.no_grad():
        logits = net(x)
        expected = _library_forward(name, net, x)
    assert len(logits) == net.num_exits >= 3
    assert all(z.shape == (2, 7) for z in logits)
    torch.testing.assert_close(logits[-1], expected, rtol=1e-4, atol=1e-5)
    macs = exit_macs(net)
    assert macs == sorted(macs) and macs[-1] > static_macs(net) > 0


def _library_forward(name, net, x):
    """The original network rebuilt from the same weights (pretrained-style state dict)."""
    library, _, model = name.partition("/")
    if library == "timm":
        import timm

        kwargs = {"img_size": net.input_size} if "vit" in model else {}
        ref = timm.create_model(model, num_classes=7, **kwargs)
    else:
        kwargs = {"image_size": net.input_size} if "vit" in model else {}
        ref = torchvision.models.get_model(model, num_classes=7, **kwargs)
    state = net.state_dict()
    ref.load_state_dict({src: state[dst] for src, dst in net.source_keys.items()})
    return ref.eval()(x)


# Plain-network MACs against torchvision's own figures (weights metadata, offline).
@pytest.mark.parametrize(
    "name",
    ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
     "efficientnet_b0", "convnext_tiny", "vit_b_16", "regnet_x_400mf"],
)  # fmt: skip
def test_static_macs_match_torchvision_metadata(name):
    with torch.device("meta") if not name.startswith("regnet") else torch.device("cpu"):
        net = create_model(f"torchvision/{name}", num_classes=1000)
    published = torchvision.models.get_model_weights(name).DEFAULT.meta["_ops"] * 1e9
    assert net.input_size == 224
    assert static_macs(net) == pytest.approx(published, rel=0.01)


def test_library_weights_are_kept_and_only_exit_heads_are_new():
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=5)
    torch.nn.init.constant_(ref.layer1[0].conv1.weight, 0.25)
    net = create_model("torchvision/resnet18", num_classes=5, input_size=64)
    net.load_state_dict(net.state_dict())  # a no-op: the mapping below is what matters
    mine = net.state_dict()
    for src, dst in net.source_keys.items():
        assert dst.startswith(("segments.", f"heads.{net.num_exits - 1}."))
        assert mine[dst].shape == ref.state_dict()[src].shape


def test_pretrained_file_survives_the_build(tmp_path):
    from safetensors.torch import save_file

    ref = torchvision.models.resnet18(num_classes=1000)
    state = {
        k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ref.state_dict().items()
    }
    save_file(state, tmp_path / "r18.safetensors")
    torch.save(state, tmp_path / "r18.pt")
    for path in ("r18.safetensors", "r18.pt"):
        net = create_model(
            "torchvision/resnet18", num_classes=10, input_size=64, pretrained=str(tmp_path / path)
        )
        mine = net.state_dict()
        for src, dst in net.source_keys.items():
            if src.startswith("fc."):  # 1000 classes in the file, 10 here: a fresh classifier
                assert mine[dst].shape[0] == 10
            else:
                assert torch.equal(mine[dst], state[src]), src


def test_pretrained_file_for_another_architecture_lists_shapes(tmp_path):
    state = torchvision.models.resnet50(num_classes=10).state_dict()
    torch.save(state, tmp_path / "r50.pt")
    with pytest.raises(
        ErdeError,
        match=r"another architecture: .*layer1.0.conv1.weight \(64, 64, 1, 1\) vs \(64, 64, 3, 3\)",
    ):
        create_model("torchvision/resnet18", pretrained=str(tmp_path / "r50.pt"), input_size=64)
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ErdeError, match="shares no tensor name"):
        create_model("torchvision/resnet18", pretrained=str(tmp_path / "foreign.pt"), input_size=64)


def test_pretrained_true_says_it_cannot_download():
    # A process of its own: huggingface_hub reads HF_HUB_OFFLINE when first imported, and in this
    # one it may be imported already, where it would wait out network timeouts instead.
    code = (
        "from erde.errors import ErdeError\n"
        "from erde.models import create_model\n"
        "try:\n"
        "    create_model('timm/test_resnet', pretrained=True, input_size=64)\n"
        "except ErdeError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "cannot download its pretrained weights here" in done.stdout


def test_freeze_backbone_trains_only_the_exit_heads():
    from erde.config.schema import ModelConfig
    from erde.models.build import build_model
    from erde.run.model_info import DataInfo

    data = DataInfo("x", [str(i) for i in range(4)], [0.5] * 3, [0.25] * 3, 64, 3)
    net = build_model(ModelConfig(name="torchvision/resnet18"), data, freeze_backbone=True)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("heads.0.", "heads.1.", "heads.2.")) for n in trainable)
    net.train()
    assert not net.segments.training and not net.heads[-1].training and net.heads[0].training
    with pytest.raises(ErdeError, match="trains only the exit heads"):
        create_model("torchvision/resnet18", exits=[], input_size=64).freeze_backbone()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("timm/resnet_18", "timm has no model 'resnet_18'; closest names: resnet18"),
        ("torchvision/resnet_18", "closest names: resnet18"),
        ("keras/resnet18", "not a model library"),
        ("timm/densenet121", "erde cuts"),
    ],
)
def test_bad_library_names(name, message):
    with pytest.raises(ErdeError, match=message):
        create_model(name, input_size=64)


def test_exit_after_a_block_that_does_not_exist():
    with pytest.raises(ErdeError, match=r"blocks 1..3 \(it has 4 blocks"):
        create_model("torchvision/resnet18", exits="5", input_size=64)


def test_builder_options_are_checked():
    net = create_model("torchvision/mobilenet_v2", width_mult=0.5, input_size=64)
    assert net.arch["width_mult"] == 0.5
    with pytest.raises(ErdeError, match="has no option"):
        create_model("torchvision/resnet18", width=3, input_size=64)


def test_arch_rebuilds_a_library_model():
    net = create_model("timm/test_vit", input_size=32, exits=[2])
    again = create_model(**net.arch)
    again.load_state_dict(net.state_dict())
    assert again.exit_blocks == net.exit_blocks == [2, 6]
