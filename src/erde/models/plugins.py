"""Models registered by the user's own package, found by every command in every process.

Two ways in: an installed package declares an entry point in the group `erde.models` whose
value is the module that registers its builders (`@register_model`), loaded the first time a
name is not found; or a config names the module (`model.module=my_pkg.models`), which is
recorded in the run's `arch`, so `evaluate`, `export` and `infer` import it too.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from erde.errors import ErdeError

GROUP = "erde.models"
_loaded = False


def load_entry_points() -> None:
    """Import every `erde.models` entry point, once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for point in entry_points(group=GROUP):
        try:
            point.load()
        except Exception as exc:  # the plugin's own bug or missing dependency, whatever it is
            raise ErdeError(
                f"the model plugin {point.name!r} ({point.value}, entry point group {GROUP}) "
                f"failed to import ({type(exc).__name__}: {_one_line(exc)}); fix or uninstall "
                "the package that declares it"
            ) from None


def import_plugin(module: str) -> None:
    """Import the module a config names, so that its builders register."""
    try:
        importlib.import_module(module)
    except Exception as exc:
        raise ErdeError(
            f"model.module={module!r} failed to import ({type(exc).__name__}: "
            f"{_one_line(exc)}); install the package or put it on PYTHONPATH"
        ) from None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]
