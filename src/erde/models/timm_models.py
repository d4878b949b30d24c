"""`timm/<name>`: exits on timm networks, cut where timm's `feature_info` says a stage ends.

Each supported family is one `TimmCut`: the modules before the stages (stem), the stages (or,
for vision transformers, the blocks) and the modules between the last stage and timm's own
`forward_head`. Whatever the stem, blocks and tail do not take belongs to the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor, nn

from erde.errors import ErdeError
from erde.models.cut import Borrowed, check_same_output, leftover_children, transformer_exits
from erde.models.early_exit import Backbone, ExitHead, TokenExitHead
from erde.models.library_names import closest_names, fetch_pretrained


@dataclass(frozen=True)
class TimmCut:
    """How one timm class splits: stem modules, blocks (a container's children or named
    modules), tail modules. `transformer`: blocks are token blocks with class-token exits."""

    stem: tuple[str, ...]
    blocks: str | tuple[str, ...]
    tail: tuple[str, ...] = ()
    transformer: bool = False


CUTS = {
    "ResNet": TimmCut(
        ("conv1", "bn1", "act1", "maxpool"), ("layer1", "layer2", "layer3", "layer4")
    ),
    "EfficientNet": TimmCut(("conv_stem", "bn1"), "blocks", ("conv_head", "bn2")),
    "MobileNetV3": TimmCut(("conv_stem", "bn1"), "blocks"),
    "ConvNeXt": TimmCut(("stem",), "stages", ("norm_pre",)),
    "RegNet": TimmCut(("stem",), ("s1", "s2", "s3", "s4"), ("final_conv",)),
    "VisionTransformer": TimmCut(
        (
            "patch_embed",
            "cls_token",
            "reg_token",
            "pos_embed",
            "pos_drop",
            "patch_drop",
            "norm_pre",
        ),
        "blocks",
        ("norm",),
        transformer=True,
    ),
}
# Patterns of the names `erde models 'timm/...'` lists (timm.list_models filters).
FAMILIES = (
    "resnet*", "resnext*", "efficientnet*", "tf_efficientnet*", "mobilenetv3*", "convnext*",
    "regnet*", "vit_*", "deit_*", "test_resnet", "test_efficientnet", "test_convnext", "test_vit",
)  # fmt: skip


def _vit_stem(m: Any, x: Tensor) -> Tensor:
    """timm VisionTransformer.forward_features up to the blocks."""
    return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


def _create(name: str, pretrained: bool, input_size: int | None, **kwargs: Any) -> nn.Module:
    """timm's network; its own errors for a wrong name, option or download made one line."""
    import timm

    if name not in timm.list_models():
        near = closest_names(name, timm.list_models())
        raise ErdeError(f"timm has no model {name!r}; closest names: {near}")
    if input_size and _takes_img_size(name):
        kwargs["img_size"] = input_size
    try:
        if pretrained:
            return fetch_pretrained(
                f"timm/{name}", lambda: timm.create_model(name, pretrained=True, **kwargs)
            )
        return timm.create_model(name, **kwargs)
    except TypeError as exc:
        raise ErdeError(f"timm/{name} refused its options: {exc}") from None


def _takes_img_size(name: str) -> bool:
    return name.startswith(("vit_", "deit", "test_vit"))


def timm_backbone(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    input_size: int | None = None,
    pretrained: bool = False,
    **options: Any,
) -> Backbone:
    """A timm network as a Backbone; its forward is checked against the cut pieces."""
    net = _create(
        name, pretrained, input_size, num_classes=num_classes, in_chans=in_channels, **options
    )
    cut = CUTS.get(type(net).__name__)
    if cut is None:
        raise ErdeError(
            f"timm/{name} is a {type(net).__name__}; erde cuts {', '.join(CUTS)} networks "
            "(register your own builder for others: README, 'Your own backbone')"
        )
    blocks, units = _blocks(net, cut)
    stem = _stem(net, cut)
    tail = [getattr(net, n) for n in cut.tail]
    head = Borrowed(
        net, leftover_children(net, [*cut.stem, *units, *cut.tail]), type(net).forward_head
    )
    classifier = nn.Sequential(*tail, head)
    size = input_size or int(net.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    check_same_output(f"timm/{name}", net, [stem, *blocks, classifier], in_channels, size)
    stride = max(int(f["reduction"]) for f in net.feature_info)
    return Backbone(
        stem=stem,
        blocks=blocks,
        classifier=classifier,
        stage_ends=_stage_ends(net, units),
        min_input_size=stride,
        default_exits=transformer_exits(len(blocks)) if cut.transformer else "stages",
        input_size=size,
        exit_head=TokenExitHead if cut.transformer else partial(ExitHead, pool_to=4),
        network=net,
        **(_weights_facts(name, net) if pretrained else {}),
    )


def _weights_facts(name: str, net: nn.Module) -> dict[str, Any]:
    """The weights timm loaded and their normalisation (`pretrained_cfg`, timm's data config)."""
    cfg = net.pretrained_cfg
    tag = cfg.get("tag")
    return {
        "weights": f"timm/{name}{f'.{tag}' if tag else ''}",
        "weights_mean": tuple(float(m) for m in cfg["mean"]) if cfg.get("mean") else None,
        "weights_std": tuple(float(s) for s in cfg["std"]) if cfg.get("std") else None,
    }


def _stem(net: nn.Module, cut: TimmCut) -> nn.Module:
    if cut.transformer:
        present = [n for n in cut.stem if hasattr(net, n)]
        return Borrowed(net, present, _vit_stem)
    return nn.Sequential(*(getattr(net, n) for n in cut.stem))


def _blocks(net: nn.Module, cut: TimmCut) -> tuple[list[nn.Module], list[str]]:
    """The blocks and the names of the `net` attributes they come from."""
    if isinstance(cut.blocks, str):
        return list(getattr(net, cut.blocks).children()), [cut.blocks]
    return [getattr(net, n) for n in cut.blocks], list(cut.blocks)


def _stage_ends(net: nn.Module, units: list[str]) -> list[int]:
    """1-based block indices closing a stage, from feature_info's module names."""
    modules = [f["module"] for f in net.feature_info]
    if len(units) > 1:
        ends = [units.index(m) + 1 for m in modules if m in units]
        count = len(units)
    else:
        prefix = units[0] + "."
        ends = [int(m[len(prefix) :].split(".")[0]) + 1 for m in modules if m.startswith(prefix)]
        count = len(getattr(net, units[0]))
    return sorted({*ends, count})


def timm_names(pattern: str) -> list[str]:
    """timm models of the supported families that match a glob pattern."""
    import timm

    names = {n for family in FAMILIES for n in timm.list_models(family)}
    return sorted(n for n in names if _fnmatch(n, pattern))


def _fnmatch(name: str, pattern: str) -> bool:
    from fnmatch import fnmatchcase

    return fnmatchcase(name, pattern)
