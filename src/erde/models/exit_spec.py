"""Turning a user's `exits` setting into block indices for one backbone.

Accepted forms (the final exit after the last block always exists and is never listed):
  None or "default"   the backbone's documented default
  "stages"            after every stage except the last
  "every:K"           after blocks K, 2K, ... before the last block
  [3, 6], "[3, 6]"    after the listed 1-based block indices (an empty list: no early exits);
  or "3,6"            text, as typed on a command line or in a config, says the same
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

from erde.config.comma_list import parse_comma_list
from erde.errors import ErdeError

FORMS = '"default", "stages", "every:K", or a list of block indices such as [3, 6] or "3,6"'


def parse_exits(
    spec: Any,
    *,
    model: str,
    num_blocks: int,
    stage_ends: Sequence[int],
    default: str | Sequence[int],
) -> list[int]:
    """Ascending 1-based block indices after which an intermediate exit sits."""
    where = _valid_range(model, num_blocks)
    if spec is None:
        spec = default
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "default":
            return parse_exits(
                default, model=model, num_blocks=num_blocks, stage_ends=stage_ends, default=default
            )
        if text == "stages":
            return list(stage_ends[:-1])
        if text.startswith("every:"):
            return _every(text[len("every:") :], num_blocks, where)
        if text.startswith("[") and text.endswith("]"):  # "[3, 6]": the list form, as text
            inner = text[1:-1].strip()
            indices = _split_commas(inner, spec, where) if inner else []
            return _check_list(indices, where, num_blocks)
        return _check_list(_split_commas(text, spec, where), where, num_blocks)
    if isinstance(spec, Iterable) and not isinstance(spec, bytes | dict):
        return _check_list(list(spec), where, num_blocks)
    hint = f" (for one exit after block {spec}, write [{spec}])" if _is_int(spec) else ""
    raise ErdeError(f"exits={spec!r} is not a valid exit setting{hint}; use {FORMS}. {where}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _valid_range(model: str, num_blocks: int) -> str:
    return (
        f"Valid exit positions for {model} are blocks 1..{num_blocks - 1} (it has {num_blocks} "
        f"blocks; the final exit after block {num_blocks} always exists and is not listed)."
    )


def _every(text: str, num_blocks: int, where: str) -> list[int]:
    try:
        k = int(text)
    except ValueError:
        raise ErdeError(
            f'exits="every:{text}": K must be a whole number, e.g. "every:3". {where}'
        ) from None
    if not 1 <= k < num_blocks:
        raise ErdeError(f'exits="every:{text}": K must be in 1..{num_blocks - 1}. {where}')
    return list(range(k, num_blocks, k))


def _split_commas(text: str, spec: str, where: str) -> list[int]:
    try:
        return parse_comma_list(text, int)
    except ValueError:
        raise ErdeError(
            f"exits={spec!r} is not a valid exit setting; use {FORMS}. {where}"
        ) from None


def _check_list(values: list[Any], where: str, num_blocks: int) -> list[int]:
    for value in values:
        if not _is_int(value):
            raise ErdeError(f"exit position {value!r} is not a block index. {where}")
    indices = [int(value) for value in values]
    outside = [i for i in indices if not 1 <= i < num_blocks]
    if outside:
        raise ErdeError(f"exit positions {outside} are out of range. {where}")
    if len(set(indices)) != len(indices):
        raise ErdeError(f"exit positions {indices} contain duplicates; list each block once.")
    return sorted(indices)
