"""metrics.jsonl, a run's one row per epoch: its format (`MetricsRow`), how a row is written
(`metrics_line`) and read back (`read_jsonl`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from annotated_types import Ge
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from erde.errors import ErdeError
from erde.files import parse_json
from erde.run.formats import VERSION_KEY, Metric, Whole, check_version, one_line

# 2: every row names its format version (version 1, which did not, is read the same way).
METRICS_VERSION = 2
_METRICS_FIX = "restore the file, or start the run again with --overwrite"


class MetricsRow(BaseModel):
    """One epoch of metrics.jsonl: `epoch`, and numbers named by the loop, among them the
    per-exit `val/acc/1..n`."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Metric]

    epoch: Annotated[Whole, Ge(1)]

    @model_validator(mode="after")
    def _exits_one_to_n(self) -> MetricsRow:
        exits = sorted(k for k in self.model_extra if k.startswith("val/acc/"))
        if exits != sorted(f"val/acc/{i}" for i in range(1, len(exits) + 1)):
            raise ValueError("the val/acc/N fields are not exits 1..n")
        return self


def metrics_line(row: dict) -> str:
    """One epoch's line of metrics.jsonl: a key-sorted JSON object with its format version."""
    return json.dumps({**row, VERSION_KEY: METRICS_VERSION}, sort_keys=True) + "\n"


def _metrics_from_version_1(row: dict) -> dict:
    """Version 1 rows held the same numbers without naming their version."""
    return row


_METRICS_MIGRATIONS = {1: _metrics_from_version_1}


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """A metrics file (`MetricsRow` per line), without the version key; only the first `limit`
    rows are read (a resumed run's, whose later lines may be half written). ErdeError naming the
    line and the field when a line is damaged."""
    if not Path(path).is_file():
        return []
    rows: list[dict] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path} line {number} is damaged"
            try:
                raw = parse_json(line)
            except ValueError as exc:
                raise _bad_line(path, number, f"not JSON ({exc})") from None
            if not isinstance(raw, dict):
                raise _bad_line(path, number, "not a JSON object")
            try:
                line_of = f"{path} line {number}"
                raw = check_version(
                    raw, line_of, METRICS_VERSION, _METRICS_MIGRATIONS, _METRICS_FIX
                )
                rows.append(MetricsRow.model_validate(raw).model_dump())
            except ValidationError as exc:
                raise ErdeError(one_line(where, exc, _METRICS_FIX)) from None
    return rows


def _bad_line(path: Path, number: int, what: str) -> ErdeError:
    return ErdeError(f"{path} line {number} is damaged: {what}; {_METRICS_FIX}")
