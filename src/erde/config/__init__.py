"""Configuration: the typed schema of a run, presets, overrides and validation, and the methods.

The names below are imported on first use (PEP 562), so that the light submodules (`methods`,
`comma_list`) that `erde --help` reads do not load OmegaConf.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_NAMES = (
    "Config",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "ModelConfig",
    "ReproduceConfig",
    "StageConfig",
    "TrainConfig",
    "load_config",
    "load_reproduce_config",
    "records",
)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'erde.config' has no attribute {name!r}")
    value = getattr(import_module("erde.config.schema"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])


__all__ = list(_NAMES)
