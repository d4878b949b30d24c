"""Model names -> builders, and `create_model`, the one way the rest of erde makes a network.

A builder is a function registered under its own name (timm style) that takes `num_classes`,
`in_channels` and its own keyword options, and returns a `Backbone`. `create_model` adds the
exits; its `arch` record rebuilds the same architecture: `create_model(**model.arch)`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from erde.device import check_model_memory
from erde.errors import ErdeError
from erde.models.early_exit import HEADS, Backbone, EarlyExitNet
from erde.models.exit_spec import parse_exits
from erde.models.plugins import import_plugin, load_entry_points
from erde.models.pretrained import load_pretrained

Builder = Callable[..., Backbone]
_BUILDERS: dict[str, Builder] = {}
_COMMON = ("num_classes", "in_channels", "input_size", "pretrained")


def register_model(builder: Builder) -> Builder:
    """Register `builder` under its function name."""
    name = builder.__name__
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered")
    _BUILDERS[name] = builder
    return builder


def list_models() -> list[str]:
    """Registered names: erde's and those of every installed plugin."""
    load_entry_points()
    return sorted(_BUILDERS)


def get_builder(name: str) -> Builder:
    """The registered builder of a name (for descriptions)."""
    return _BUILDERS[name]


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    exits: Any = None,
    input_size: int | None = None,
    module: str | None = None,
    pretrained: bool | str | None = None,
    head: str = "paper",
    **kwargs: Any,
) -> EarlyExitNet:
    """Build a backbone with exits; see `erde.models.exit_spec` for `exits` forms.

    `name` is a registered builder (erde's, or a plugin's: `module` is imported first, and the
    `erde.models` entry points are loaded when the name is unknown) or `timm/NAME` /
    `torchvision/NAME`. `input_size` defaults to the network's own. `pretrained`: a weights
    file for the backbone, or True for the library's own weights; it is not part of `arch`,
    which rebuilds the architecture: `create_model(**model.arch)`. `head`: the early exits'
    head, the paper's (`ExitHead`) or `pool` (the same on the globally pooled map).
    """
    if head not in HEADS:
        raise ErdeError(f"model.head={head!r} is not a head; choose {' or '.join(HEADS)}")
    if module:
        import_plugin(module)
    key = name.strip().lower() if isinstance(name, str) else name
    builder = _builder(key)
    _check_sizes(num_classes, in_channels, input_size)
    options = _builder_options(key, builder, kwargs, input_size, pretrained)
    kwargs = {"num_classes": num_classes, "in_channels": in_channels, **options}
    backbone = _build(key, builder, input_size, kwargs)
    size = input_size or backbone.input_size
    _check_input_size(key, backbone, size)
    exit_blocks = parse_exits(
        exits,
        model=key,
        num_blocks=len(backbone.blocks),
        stage_ends=backbone.stage_ends,
        default=backbone.default_exits,
    )
    arch = {
        "name": key,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "exits": exit_blocks,
        "input_size": size,
        **({"module": module} if module else {}),
        **({"head": head} if head != "paper" else {}),  # older runs' arch stays as it was
        **kwargs,
    }
    net = EarlyExitNet(
        backbone,
        exit_blocks,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=size,
        arch=arch,
        head=head,
    )
    if isinstance(pretrained, str):
        load_pretrained(net, pretrained)
    return net


def _check_sizes(num_classes: int, in_channels: int, input_size: int | None) -> None:
    """Reject bad class, channel and image-size counts, and models too big for memory."""
    _check_count("num_classes", num_classes, 2)
    _check_count("in_channels", in_channels, 1)
    if input_size is not None:
        _check_count("input_size", input_size, 1)
    check_model_memory(num_classes, in_channels, input_size)


def _builder_options(
    key: str, builder: Any, kwargs: dict, input_size: int | None, pretrained: bool | str | None
) -> dict:
    """The builder's keyword arguments: `kwargs`, plus pretrained and input_size where it takes
    them (the user's `kwargs` checked against what the builder accepts)."""
    options = dict(kwargs)
    if pretrained is True:
        options["pretrained"] = True
    params = inspect.signature(builder).parameters
    if "input_size" in params:
        options["input_size"] = input_size
    _check_options(key, builder, kwargs, pretrained is True)
    return options


def _build(key: str, builder: Builder, input_size: int | None, kwargs: dict) -> Backbone:
    """The builder's backbone. A library network checks an image size when it is built, or runs
    its first forward at it (erde compares the cut pieces with the whole): failing there for the
    size the user chose is that size's problem, said in one line with the sizes that work."""
    if input_size is None or not isinstance(builder, functools.partial):
        return builder(**kwargs)
    try:
        return builder(**kwargs)
    except torch.OutOfMemoryError:
        raise
    except (AssertionError, RuntimeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ErdeError(
            f"{key} cannot take {input_size}x{input_size} images ({type(exc).__name__}: "
            f"{reason}); choose another input size (--input-size; data.image_size when "
            "training): convolutional networks take sizes of at least their total stride (32 "
            "for most), vision transformers multiples of their patch size (16 for vit_b_16)"
        ) from None


def _check_input_size(key: str, backbone: Any, size: int) -> None:
    """Reject images smaller than the backbone's strides allow."""
    if size < backbone.min_input_size:
        raise ErdeError(
            f"input_size={size} is too small for {key}: its strides need images of at "
            f"least {backbone.min_input_size}x{backbone.min_input_size}; resize the images up or "
            "pick a backbone with fewer downsampling stages"
        )


def _builder(key: str) -> Builder:
    """The builder of a name: a library's, a registered one, or one an entry point registers."""
    library, _, rest = key.partition("/") if isinstance(key, str) else ("", "", "")
    if rest:
        if library not in LIBRARIES:
            raise ErdeError(
                f"unknown model {key!r}: {library!r} is not a model library erde reads; "
                f"use {' or '.join(f'{lib}/NAME' for lib in LIBRARIES)}, or a registered name"
            )
        return functools.partial(LIBRARIES[library](), rest)
    if key not in _BUILDERS:
        load_entry_points()
    builder = _BUILDERS.get(key)
    if builder is None:
        raise ErdeError(
            f"unknown model {key!r}; choose one of: {', '.join(list_models())}, or "
            "timm/NAME, torchvision/NAME (`erde models` describes them)"
        )
    return builder


def _timm() -> Builder:
    from erde.models.timm_models import timm_backbone

    return timm_backbone


def _torchvision() -> Builder:
    from erde.models.torchvision_models import torchvision_backbone

    return torchvision_backbone


# Imported on first use: timm takes seconds to import and most commands never build its models.
LIBRARIES: dict[str, Callable[[], Builder]] = {"timm": _timm, "torchvision": _torchvision}


def _check_count(what: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ErdeError(f"{what} must be a whole number >= {minimum}, got {value!r}")


def _check_options(name: str, builder: Builder, kwargs: dict[str, Any], pretrained: bool) -> None:
    """A registered builder's options are its keyword parameters; a library's, its own check."""
    if isinstance(builder, functools.partial):
        return
    params = inspect.signature(builder).parameters
    options = [p for p in params if p not in _COMMON]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        known = ", ".join(options) if options else "none"
        raise ErdeError(f"model {name!r} has no option(s) {unknown}; its options are: {known}")
    if pretrained and "pretrained" not in params:
        raise ErdeError(
            f"model {name!r} has no weights to fetch (model.pretrained=true is for timm/NAME, "
            "torchvision/NAME and builders with a `pretrained` option); give a weights file: "
            "model.pretrained=PATH"
        )
