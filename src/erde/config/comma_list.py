"""The one reading of comma lists of numbers ("0,1,2", "0.5, 1"), wherever a user types one.

Items are stripped of spaces; a blank item ("3,,6", "0,1,") or one `kind` cannot read makes the
whole text a mistake rather than being skipped, since it is usually a typo for a missing number.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)

_NOUNS = {int: "integers", float: "numbers"}


def parse_comma_list(text: str, kind: type[T]) -> list[T]:
    """`kind` values of a comma list; ValueError naming the text when it is not one."""
    parts = [part.strip() for part in text.split(",")]
    try:
        if all(parts):
            return [kind(part) for part in parts]
    except ValueError:
        pass
    raise ValueError(f"{text!r} is not a comma list of {_NOUNS.get(kind, kind.__name__)}")


def comma_list_type(kind: type[T]) -> Callable[[str], list[T]]:
    """`parse_comma_list` as an argparse `type=`, so a bad list is a one-line usage error."""

    def parse(text: str) -> list[T]:
        try:
            return parse_comma_list(text, kind)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


__all__ = ["comma_list_type", "parse_comma_list"]
