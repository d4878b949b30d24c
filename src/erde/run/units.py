"""How every message and report writes a quantity, so one quantity has one unit everywhere:
accuracies in percent, MACs in millions."""

from __future__ import annotations


def percent(fraction: float, digits: int = 2) -> str:
    """A fraction in [0, 1] as "63.89 %"."""
    return f"{100 * fraction:.{digits}f} %"


def millions(macs: float, digits: int = 4) -> str:
    """A MACs count in millions with `digits` significant digits: "22.23 M", "0.8967 M"."""
    return f"{macs / 1e6:.{digits}g} M"
