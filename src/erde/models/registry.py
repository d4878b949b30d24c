"""Model names -> builders, and `create_model`, the one way the rest of erde makes a network.

A builder is a function registered under its own name (timm style) that takes `num_classes`,
`in_channels` and its own keyword options, and returns a `Backbone`. `create_model` adds the
exits; its `arch` record rebuilds the same architecture: `create_model(**model.arch)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from erde.errors import ErdeError
from erde.models.early_exit import Backbone, EarlyExitNet
from erde.models.exit_spec import parse_exits

Builder = Callable[..., Backbone]
_BUILDERS: dict[str, Builder] = {}
_COMMON = ("num_classes", "in_channels")


def register_model(builder: Builder) -> Builder:
    """Register `builder` under its function name."""
    name = builder.__name__
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered")
    _BUILDERS[name] = builder
    return builder


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    exits: Any = None,
    input_size: int = 32,
    **kwargs: Any,
) -> EarlyExitNet:
    """Build a registered backbone with exits; see `erde.models.exit_spec` for `exits` forms."""
    key = name.strip().lower() if isinstance(name, str) else name
    builder = _BUILDERS.get(key)
    if builder is None:
        raise ErdeError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    _check_count("num_classes", num_classes, 2)
    _check_count("in_channels", in_channels, 1)
    _check_count("input_size", input_size, 1)
    _check_options(key, builder, kwargs)

    backbone = builder(num_classes=num_classes, in_channels=in_channels, **kwargs)
    if input_size < backbone.min_input_size:
        raise ErdeError(
            f"input_size={input_size} is too small for {key}: its strides need images of at "
            f"least {backbone.min_input_size}x{backbone.min_input_size}; resize the images up or "
            "pick a backbone with fewer downsampling stages"
        )
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
        "input_size": input_size,
        **kwargs,
    }
    return EarlyExitNet(
        backbone,
        exit_blocks,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=input_size,
        arch=arch,
    )


def _check_count(what: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ErdeError(f"{what} must be a whole number >= {minimum}, got {value!r}")


def _check_options(name: str, builder: Builder, kwargs: dict[str, Any]) -> None:
    options = [p for p in inspect.signature(builder).parameters if p not in _COMMON]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        known = ", ".join(options) if options else "none"
        raise ErdeError(f"model {name!r} has no option(s) {unknown}; its options are: {known}")
