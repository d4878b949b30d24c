"""What `erde models` shows: one row per model, built on the meta device (no weights, no
compute) where the library allows, so the MACs and parameter counts of big networks are cheap."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from erde.errors import ErdeError
from erde.models.early_exit import EarlyExitNet
from erde.models.registry import LIBRARIES, create_model, get_builder, list_models


@dataclass(frozen=True)
class ModelRow:
    name: str
    source: str
    default_exits: list[int]
    input_size: int
    macs: int
    params: int
    description: str


def model_names(pattern: str = "*") -> list[str]:
    """Registered names matching a glob; `timm/...` and `torchvision/...` patterns list the
    library's models of the families erde cuts."""
    pattern = pattern.strip().lower()
    library, _, rest = pattern.partition("/")
    if rest and library == "timm":
        from erde.models.timm_models import timm_names

        return [f"timm/{n}" for n in timm_names(rest)]
    if rest and library == "torchvision":
        from erde.models.torchvision_models import torchvision_names

        return [f"torchvision/{n}" for n in torchvision_names() if fnmatchcase(n, rest)]
    if rest:
        raise ErdeError(f"no model library {library!r}; use {', '.join(LIBRARIES)}")
    return [n for n in list_models() if fnmatchcase(n, pattern)]


def describe(name: str) -> ModelRow:
    """The row of one model at its own input size (ImageNet's 1000 classes for library
    models, 10 for the others)."""
    from erde.models.macs import static_macs

    library = name.split("/")[0] if "/" in name else None
    net = _build(name, 1000 if library else 10)
    exits = net.exit_blocks[:-1]
    return ModelRow(
        name=name,
        source=library or _source(name),
        default_exits=exits,
        input_size=net.input_size,
        macs=static_macs(net),
        params=sum(p.numel() for p in net.parameters()),
        description=_description(name, net),
    )


def _build(name: str, num_classes: int) -> EarlyExitNet:
    try:
        with torch.device("meta"):
            return create_model(name, num_classes=num_classes)
    except NotImplementedError:  # a builder that reads tensor values while it builds
        return create_model(name, num_classes=num_classes)


def _source(name: str) -> str:
    module = get_builder(name).__module__
    return "erde" if module.startswith("erde.") else module.split(".")[0]


def _description(name: str, net: EarlyExitNet) -> str:
    if "/" in name:
        return f"{name.split('/')[0]} {net.family}, ImageNet design"
    doc = get_builder(name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
