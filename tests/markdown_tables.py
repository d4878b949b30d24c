"""Read the tables of a markdown report back, as a reader would: header cells and row cells."""

from __future__ import annotations

import re
import statistics

_RULE = re.compile(r"\|(?:---\|)+")
_CELL_SEPARATOR = re.compile(r"(?<!\\)\|")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in _CELL_SEPARATOR.split(line.strip())[1:-1]]


def markdown_tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table of `md`, in order: its header cells and the cells of each row."""
    lines = md.splitlines()
    tables = []
    for i in range(len(lines) - 1):
        if lines[i].startswith("|") and _RULE.fullmatch(lines[i + 1]):
            rows = []
            for line in lines[i + 2 :]:
                if not line.startswith("|"):
                    break
                rows.append(_cells(line))
            tables.append((_cells(lines[i]), rows))
    return tables


def table_rows(md: str, column: str) -> list[dict[str, str]]:
    """The rows, by header, of the one table of `md` that has a column named `column`."""
    found = [(h, rows) for h, rows in markdown_tables(md) if column in h]
    assert len(found) == 1, f"{len(found)} tables have a column {column!r}"
    headers, rows = found[0]
    return [dict(zip(headers, row, strict=True)) for row in rows]


def seeds_text(values: list[float], unit: str = "") -> str:
    """A number over seeds as reports write it: mean ± sample std, 2 decimals."""
    if len(values) == 1:
        return f"{values[0]:.2f}{unit}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}{unit}"
