"""`torchvision/<name>`: exits on torchvision classification networks, cut by module names.

Each supported class has one function naming its stem, its blocks and its classifier (the
modules after the blocks, in forward order). Networks whose `features` list single blocks
(MobileNet) get their stage ends from where the feature map shrinks.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from erde.errors import ErdeError
from erde.models.cut import Borrowed, check_same_output, stage_ends_by_size, transformer_exits
from erde.models.early_exit import Backbone, ExitHead, TokenExitHead
from erde.models.library_names import closest_names, fetch_pretrained

log = logging.getLogger("erde.models")

Pieces = tuple[nn.Module, list[nn.Module], nn.Module]


def _pooled(*head: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), *head)


def _resnet(m: Any) -> Pieces:
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    return stem, [m.layer1, m.layer2, m.layer3, m.layer4], _pooled(m.fc)


def _features(m: Any) -> Pieces:
    """MobileNetV2/V3, EfficientNet: features[0] stem, features[-1] the last 1x1 conv."""
    f = list(m.features)
    return f[0], f[1:-1], nn.Sequential(f[-1], _pooled(m.classifier))


def _convnext(m: Any) -> Pieces:
    """features = stem, stage, (downsample, stage) x 3: a downsample opens the next block."""
    f = list(m.features)
    blocks = [f[1]] + [nn.Sequential(f[i], f[i + 1]) for i in range(2, len(f), 2)]
    return f[0], blocks, nn.Sequential(m.avgpool, m.classifier)


def _regnet(m: Any) -> Pieces:
    return m.stem, list(m.trunk_output), _pooled(m.fc)


def _vit_stem(m: Any, x: Tensor) -> Tensor:
    """torchvision VisionTransformer.forward up to the encoder's layers."""
    x = m._process_input(x)
    x = torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    return m.dropout(x + m.pos_embedding)


class _ClassToken(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


def _vit(m: Any) -> Pieces:
    stem = Borrowed(m, ["conv_proj", "class_token"], _vit_stem)
    stem.pos_embedding, stem.dropout = m.encoder.pos_embedding, m.encoder.dropout
    classifier = nn.Sequential(m.encoder.ln, _ClassToken(), m.heads)
    return stem, list(m.encoder.layers), classifier


CUTS: dict[str, Callable[[Any], Pieces]] = {
    "ResNet": _resnet,
    "MobileNetV2": _features,
    "MobileNetV3": _features,
    "EfficientNet": _features,
    "ConvNeXt": _convnext,
    "RegNet": _regnet,
    "VisionTransformer": _vit,
}
# Block-by-block classes: their stages come from the feature-map sizes.
_PER_BLOCK = ("MobileNetV2", "MobileNetV3")


def torchvision_names() -> list[str]:
    """torchvision's classification models of the supported classes."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if n.split("_")[0] in _PREFIXES or n.startswith(_PREFIXES)]


_PREFIXES = (
    "resnet", "resnext", "wide_resnet", "mobilenet_v2", "mobilenet_v3", "efficientnet",
    "convnext", "regnet", "vit_",
)  # fmt: skip


def torchvision_backbone(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    input_size: int | None = None,
    pretrained: bool = False,
    **options: Any,
) -> Backbone:
    """A torchvision network as a Backbone; its forward is checked against the cut pieces."""
    if in_channels != 3:
        raise ErdeError(
            f"torchvision/{name} takes 3-channel images and has no option for "
            f"{in_channels}; convert the data to RGB or use a timm model (in_chans)"
        )
    net = _create(name, num_classes, input_size, pretrained, options)
    weights = _weights_facts(name) if pretrained else {}
    cut = CUTS.get(type(net).__name__)
    if cut is None:
        raise ErdeError(
            f"torchvision/{name} is a {type(net).__name__}; erde cuts {', '.join(CUTS)} "
            "networks (register your own builder for others: README, 'Your own backbone')"
        )
    stem, blocks, classifier = cut(net)
    transformer = type(net).__name__ == "VisionTransformer"
    size = input_size or (net.image_size if transformer else _native_size(name))
    check_same_output(f"torchvision/{name}", net, [stem, *blocks, classifier], 3, size)
    if type(net).__name__ in _PER_BLOCK:
        stage_ends = stage_ends_by_size(stem, blocks, 3, max(size, 32))
    else:
        stage_ends = list(range(1, len(blocks) + 1))
    return Backbone(
        stem=stem,
        blocks=blocks,
        classifier=classifier,
        stage_ends=stage_ends,
        min_input_size=net.patch_size if transformer else 32,
        default_exits=transformer_exits(len(blocks)) if transformer else "stages",
        input_size=size,
        exit_head=TokenExitHead if transformer else partial(ExitHead, pool_to=4),
        network=net,
        **weights,
    )


def _weights_facts(name: str) -> dict[str, Any]:
    """The default weights' name and the normalisation their preprocessing applies."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    preprocess = weights.transforms()
    return {
        "weights": f"torchvision/{name} {weights}",
        "weights_mean": tuple(float(m) for m in preprocess.mean),
        "weights_std": tuple(float(s) for s in preprocess.std),
    }


def _create(
    name: str, num_classes: int, input_size: int | None, pretrained: bool, options: dict
) -> nn.Module:
    import torchvision

    names = torchvision_names()
    if name not in names:
        raise ErdeError(
            f"torchvision has no supported model {name!r}; closest names: "
            f"{closest_names(name, names)}"
        )
    builder = torchvision.models.get_model_builder(name)
    kwargs = dict(options, num_classes=num_classes)
    if input_size and name.startswith("vit_"):
        kwargs["image_size"] = input_size
    _check_options(name, builder, options)
    if not pretrained:
        return builder(**kwargs)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    trained = fetch_pretrained(f"torchvision/{name}", lambda: builder(weights=weights, **options))
    if num_classes == len(weights.meta["categories"]):
        return trained
    # Another class count: timm's rule (create_model(..., pretrained=True, num_classes=N)),
    # every tensor but the classifier's from the weights, the classifier started afresh.
    net = builder(**kwargs)
    state = net.state_dict()
    kept = {k: v for k, v in trained.state_dict().items() if v.shape == state[k].shape}
    net.load_state_dict(kept, strict=False)
    log.info(
        "torchvision/%s: pretrained weights for %d classes, the data has %d: classifier "
        "(%s) started afresh",
        name,
        len(weights.meta["categories"]),
        num_classes,
        ", ".join(sorted(set(state) - set(kept))),
    )
    return net


def _check_options(name: str, builder: Callable, options: dict) -> None:
    """torchvision builders pass **kwargs on to the network's class: check against both."""
    import torchvision

    cls = getattr(torchvision.models, _class_name(builder), None)
    known = set(inspect.signature(builder).parameters) - {"weights", "progress", "kwargs"}
    if cls is not None:
        known |= set(inspect.signature(cls).parameters) - {"num_classes"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ErdeError(
            f"torchvision/{name} has no option(s) {unknown}; its options are: "
            f"{', '.join(sorted(known))}"
        )


def _class_name(builder: Callable) -> str:
    ret = inspect.signature(builder).return_annotation
    return ret if isinstance(ret, str) else getattr(ret, "__name__", "")


def _native_size(name: str) -> int:
    """The crop size of the name's default weights (224 for most)."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    return int(weights.transforms.keywords.get("crop_size", 224))
