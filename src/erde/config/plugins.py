"""Plugins: the user's own models, methods and exit policies, found by every command in every
process.

Two ways in, the same for each kind (`erde.models.plugins`, `erde.config.methods`,
`erde.evaluation.policies`): an installed package declares an entry point in the kind's group
(`erde.models`, `erde.methods`, `erde.policies`) whose value
is the module that registers them, loaded the first time a name is not found; or a config names
the module (`model.module=my_pkg.models`, `distill.module=my_pkg.methods`), which the run
records, so `evaluate`, `compare`, `export` and `infer` import it too.

A run folder may come from anyone, and importing a module runs its code: a module that a run's
files name is imported only when it is erde's own, a catalogue library's (torchvision, timm), an
installed plugin's entry point, or listed in `ERDE_TRUST_MODULES` (comma-separated).
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import entry_points

from erde.errors import ErdeError

GROUPS = {"model": "erde.models", "method": "erde.methods", "policy": "erde.policies"}
TRUST_VARIABLE = "ERDE_TRUST_MODULES"
_OWN = ("erde", "torchvision", "timm")  # erde and the catalogue's libraries
_loaded: set[str] = set()


def load_entry_points(kind: str) -> None:
    """Import every entry point of the kind's group (`model`, `method`), once per process."""
    group = GROUPS[kind]
    if group in _loaded:
        return
    _loaded.add(group)
    for point in entry_points(group=group):
        try:
            point.load()
        except ErdeError as exc:
            raise ErdeError(f"the {kind} plugin {point.name!r} ({point.value}): {exc}") from None
        except Exception as exc:  # the plugin's own bug or missing dependency, whatever it is
            raise ErdeError(
                f"the {kind} plugin {point.name!r} ({point.value}, entry point group {group}) "
                f"failed to import ({type(exc).__name__}: {one_line(exc)}); fix or uninstall "
                "the package that declares it"
            ) from None


def import_plugin(module: str, key: str, source: str | None = None) -> None:
    """Import the module a config names at `key` (`model.module`), so that what it declares
    registers; `source`: the run file that names it, where it is not the user's own config."""
    try:
        importlib.import_module(module)
    except ErdeError as exc:  # what the plugin declares is refused (`register_method`)
        raise ErdeError(f"{key}={module!r}: {exc}") from None
    except Exception as exc:
        where = f" ({source})" if source else ""
        raise ErdeError(
            f"{key}={module!r}{where} failed to import ({type(exc).__name__}: "
            f"{one_line(exc)}); install the package or put it on PYTHONPATH"
        ) from None


def check_trusted(module: object, source: str, kind: str = "model") -> None:
    """Refuse a module named by a file (`source`) unless the user allowed it: importing it would
    run whatever code it holds, found anywhere on sys.path (the current folder included)."""
    name = module if isinstance(module, str) else ""
    if name in sys.modules:  # imported already (the user's own config named it): no new code runs
        return
    parts = name.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    if name and "__main__" not in parts and prefixes & trusted_modules():
        return
    raise ErdeError(
        f"{source} names the {kind} module {module!r}, which erde does not import from a run "
        f"folder unless you allow it (importing runs its code); if you trust it, set "
        f"{TRUST_VARIABLE}={module} (comma-separated names), or install it as an "
        f"{GROUPS[kind]} entry point"
    )


def trusted_modules() -> set[str]:
    """Modules (with their submodules) a run may name: erde's, the libraries', the installed
    plugins' entry points and those in ERDE_TRUST_MODULES."""
    listed = {n.strip() for n in os.environ.get(TRUST_VARIABLE, "").split(",") if n.strip()}
    points = {p.module for group in GROUPS.values() for p in entry_points(group=group)}
    return {*_OWN, *points, *listed}


def one_line(exc: Exception) -> str:
    """An exception's text on one line, at most 300 characters."""
    return " ".join(str(exc).split())[:300]


__all__ = [
    "GROUPS",
    "TRUST_VARIABLE",
    "check_trusted",
    "import_plugin",
    "load_entry_points",
    "one_line",
    "trusted_modules",
]
