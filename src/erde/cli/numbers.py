"""Whole-number options checked where they are parsed, so a bad value is a usage error naming
the option, before any work (a thread count of 100000 made ONNX Runtime hang)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type` for a whole number from `low` to `high` (no upper bound: None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            span = f"of at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"{value}: give a whole number {span}")
        return value

    return parse
