"""erde: early-exit image classifiers trained by Entropy-Regularized Distillation.

The names a user needs, imported on first use (PEP 562) so that `import erde` and `erde --help`
do not load PyTorch:

    import erde
    model = erde.EarlyExitModel.from_pretrained("runs/erde")
    model.predict_files(["digit.png"]).classes
"""

from __future__ import annotations

from importlib import import_module, metadata
from typing import Any

from erde.errors import ErdeError

try:
    __version__ = metadata.version("erde")  # the installed distribution's, from pyproject.toml
except metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

# name -> module that defines it
_LAZY = {
    "create_model": "erde.models",
    "list_models": "erde.models",
    "EarlyExitModel": "erde.deploy.early_exit_model",
    "Predictions": "erde.deploy.early_exit_model",
    "EarlyExitRuntime": "erde.deploy",
    "export_run": "erde.deploy",
    "load_config": "erde.config",
    "load_reproduce_config": "erde.config",
    "fit": "erde.train",
    "evaluate": "erde.evaluation.runs",
    "compare": "erde.evaluation.runs",
}
_RENAMED = {"evaluate": "evaluate_run", "compare": "compare_runs"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'erde' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["ErdeError", "__version__", *_LAZY]
