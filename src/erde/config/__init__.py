"""Configuration: the typed schema of a run, presets, overrides and validation, and the methods.

The names below are imported on first use (PEP 562), so that the light submodules (`methods`,
`comma_list`) that `erde --help` reads do not load OmegaConf.
"""

from __future__ import annotations

from erde import lazy_names

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

__getattr__, __dir__ = lazy_names(__name__, dict.fromkeys(_NAMES, "erde.config.schema"))

__all__ = list(_NAMES)
