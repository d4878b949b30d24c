"""What `erde models` shows. A listing names models without building any (a pattern may match
hundreds of library networks, `vit_h_14` among them); one model is built, on the meta device
(no weights, no compute) where the library allows, for its exits, MACs and parameters."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from erde.errors import ErdeError
from erde.models.early_exit import EarlyExitNet
from erde.models.registry import LIBRARIES, create_model, get_builder, list_models

# Library networks are ImageNet designs, described with ImageNet's class count by default.
LIBRARY_CLASSES, OWN_CLASSES = 1000, 10


@dataclass(frozen=True)
class ModelName:
    """A listing's row: what is known without building the network."""

    name: str
    source: str
    description: str


@dataclass(frozen=True)
class ModelRow:
    """One built model: `params` counts every exit head, each with `num_classes` outputs."""

    name: str
    source: str
    default_exits: list[int]
    input_size: int
    macs: int
    params: int
    num_classes: int
    description: str


def model_names(pattern: str = "*") -> list[str]:
    """Registered names matching a glob; `timm/...` and `torchvision/...` patterns list the
    library's models of the families erde cuts (by name: nothing is built)."""
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


def name_row(name: str) -> ModelName:
    """A listing's row of `name`, from its registration alone."""
    library = _library(name)
    if library:
        return ModelName(name, library, f"{library} network, ImageNet design")
    doc = (get_builder(name).__doc__ or "").strip()
    return ModelName(name, _source(name), doc.splitlines()[0] if doc else "")


def describe(name: str, num_classes: int | None = None) -> ModelRow:
    """The row of one built model at its own input size, with `num_classes` classes
    (default: ImageNet's 1000 for library models, 10 for the others)."""
    from erde.models.macs import static_macs

    library = _library(name)
    if num_classes is None:
        num_classes = LIBRARY_CLASSES if library else OWN_CLASSES
    net = _build(name, num_classes)
    about = f"{library} {net.family}, ImageNet design" if library else name_row(name).description
    return ModelRow(
        name=name,
        source=library or _source(name),
        default_exits=net.exit_blocks[:-1],
        input_size=net.input_size,
        macs=static_macs(net),
        params=sum(p.numel() for p in net.parameters()),
        num_classes=num_classes,
        description=about,
    )


def namespaces() -> str:
    """What the names of each namespace are, and how to list the libraries' ones."""
    timm = "" if importlib.util.find_spec("timm") else " (not installed: pip install 'erde[timm]')"
    return (
        "namespaces: plain names are erde's own models and plugins' (packages with an "
        "erde.models entry point, source column); timm/NAME are timm's networks"
        f"{timm}, `erde models 'timm/*'`; torchvision/NAME are torchvision's, "
        "`erde models 'torchvision/*'`"
    )


def _library(name: str) -> str | None:
    return name.split("/")[0] if "/" in name else None


def _build(name: str, num_classes: int) -> EarlyExitNet:
    try:
        with torch.device("meta"):
            return create_model(name, num_classes=num_classes)
    except NotImplementedError:  # a builder that reads tensor values while it builds
        return create_model(name, num_classes=num_classes)


def _source(name: str) -> str:
    module = get_builder(name).__module__
    return "erde" if module.startswith("erde.") else module.split(".")[0]
