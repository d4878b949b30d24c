"""Models registered by the user's own package (`@register_model`): the `erde.models` entry
point group and `model.module`, through erde's one plugin mechanism (`erde.config.plugins`)."""

from __future__ import annotations

from erde.config import plugins
from erde.config.plugins import TRUST_VARIABLE, trusted_modules

GROUP = plugins.GROUPS["model"]


def load_entry_points() -> None:
    """Import every `erde.models` entry point, once per process."""
    plugins.load_entry_points("model")


def import_plugin(module: str) -> None:
    """Import the module a config names, so that its builders register."""
    plugins.import_plugin(module, "model.module")


def check_trusted(module: object, source: str) -> None:
    """Refuse a model module named by a run file unless the user allowed it."""
    plugins.check_trusted(module, source, "model")


__all__ = [
    "GROUP",
    "TRUST_VARIABLE",
    "check_trusted",
    "import_plugin",
    "load_entry_points",
    "trusted_modules",
]
