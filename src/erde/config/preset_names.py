"""The names of the shipped presets, with the standard library only: `erde --help` lists them,
and `erde infer`, which builds the same parser, must not load OmegaConf for it."""

from __future__ import annotations

from importlib import resources


def preset_names(kind: str = "train") -> list[str]:
    """Presets shipped inside the package, so `erde` works from any install, not only a checkout."""
    folder = resources.files("erde.config") / "presets" / kind
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
