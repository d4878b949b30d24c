"""erde: early-exit image classifiers trained by Entropy-Regularized Distillation.

The names a user needs, imported on first use (PEP 562) so that `import erde` and `erde --help`
do not load PyTorch:

    import erde
    model = erde.EarlyExitModel.from_pretrained("runs/erde")
    model.predict_files(["digit.png"]).classes
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module, metadata
from typing import Any

from erde.errors import ErdeError

try:
    __version__ = metadata.version("erde")  # the installed distribution's, from pyproject.toml
except metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"


def lazy_names(
    package: str, table: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """PEP 562 `__getattr__` and `__dir__` for `package`: each name of `table` ("module", or
    "module:attribute" for another name there) is imported on first use, so the package's
    light modules load without its heavy ones (PyTorch, OmegaConf)."""

    def get(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = table[name].partition(":")
        value = getattr(import_module(module), attribute or name)
        setattr(sys.modules[package], name, value)
        return value

    def names() -> list[str]:
        return sorted({*vars(sys.modules[package]), *table})

    return get, names


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
    "register_method": "erde.config.methods",
    "MethodKey": "erde.config.methods",
    "Range": "erde.config.records",
    "Search": "erde.config.records",
    "ExitContext": "erde.distill.losses",
    "evaluate": "erde.evaluation.runs:evaluate_run",
    "compare": "erde.evaluation.runs:compare_runs",
    "register_policy": "erde.evaluation.policies",
}
__getattr__, __dir__ = lazy_names(__name__, _LAZY)

__all__ = ["ErdeError", "__version__", *_LAZY]
