"""Models registered by the user's own package, found by every command in every process.

Two ways in: an installed package declares an entry point in the group `erde.models` whose
value is the module that registers its builders (`@register_model`), loaded the first time a
name is not found; or a config names the module (`model.module=my_pkg.models`), which is
recorded in the run's `arch`, so `evaluate`, `export` and `infer` import it too.

A run folder may come from anyone, and importing a module runs its code: a module that a run's
`model.json` names is imported only when it is erde's own, a catalogue library's (torchvision,
timm), an installed plugin's entry point, or listed in `ERDE_TRUST_MODULES` (comma-separated).
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from erde.errors import ErdeError

GROUP = "erde.models"
TRUST_VARIABLE = "ERDE_TRUST_MODULES"
_OWN = ("erde", "torchvision", "timm")  # erde and the catalogue's libraries
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


def check_trusted(module: object, source: str) -> None:
    """Refuse a module named by a file (`source`) unless the user allowed it: importing it would
    run whatever code it holds, found anywhere on sys.path (the current folder included)."""
    name = module if isinstance(module, str) else ""
    parts = name.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    if name and "__main__" not in parts and prefixes & trusted_modules():
        return
    raise ErdeError(
        f"{source} names the model module {module!r}, which erde does not import from a run "
        f"folder unless you allow it (importing runs its code); if you trust it, set "
        f"{TRUST_VARIABLE}={module} (comma-separated names), or install it as an {GROUP} "
        "entry point"
    )


def trusted_modules() -> set[str]:
    """Modules (with their submodules) a run may name: erde's, the libraries', the installed
    plugins' entry points and those in ERDE_TRUST_MODULES."""
    listed = {n.strip() for n in os.environ.get(TRUST_VARIABLE, "").split(",") if n.strip()}
    return {*_OWN, *(point.module for point in entry_points(group=GROUP)), *listed}


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]
