"""The rules of erde's JSON files, stated once, and the reading of a file with a format version.

`model.json`, `metrics.jsonl`, `eval/report.json` and an export's `manifest.json` are described
as pydantic types (`erde.run.model_info`, `erde.files`, `erde.run.report`,
`erde.deploy.manifest`) built from the field types below, so a field two formats share (the
cumulative `ExitMacs`, the `Classes`, a `Sha256`) obeys one rule in both. `check_version` brings
a file of an older format version up to date through the format's explicit migration functions
and refuses a newer or retired one with the command that rewrites it; `validate` turns pydantic's
first validation error into one line that names the file, the field and the fix.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from annotated_types import Ge, Gt, Interval, Le, MinLen
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BeforeValidator,
    PlainValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from erde.errors import ErdeError

T = TypeVar("T")

# The key of every file's format version (a file written before versions existed is version 1).
VERSION_KEY = "format_version"
# The smallest pixel std (0..1 scale) a model may record. A channel that is not constant has a
# std of at least about 1 / (255 sqrt(N)) over N pixels (a constant one is recorded as 1), so
# only a training set of over 10^13 pixels could come below it.
MIN_STD = 1e-6


def _increasing(values: list[int]) -> list[int]:
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError("must increase from the first exit to the last (they are cumulative)")
    return values


def _unique(values: list[str]) -> list[str]:
    twice = next((v for v in values if values.count(v) > 1), None)
    if twice is not None:
        raise ValueError(f"names {twice!r} twice")
    return values


def _nan_for_null(value: Any) -> Any:
    """`erde.files.write_json` writes NaN (a quantity of an empty split) as null."""
    return math.nan if value is None else value


def _metric(value: Any) -> int | float:
    """A JSON number as it was written (an int stays an int); a bool is none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("is not a number")
    return value


Text = StrictStr
Flag = StrictBool
Whole = StrictInt
Count = Annotated[StrictInt, Gt(0)]  # a positive whole number: sizes, MACs, exits
Number = StrictFloat  # any JSON number (an int too), read as a float
Finite = Annotated[StrictFloat, AllowInfNan(False)]
NonNegative = Annotated[Finite, Ge(0)]
Measured = Annotated[StrictFloat, BeforeValidator(_nan_for_null)]  # null reads as NaN
Metric = Annotated[int | float, PlainValidator(_metric)]
Sha256 = Annotated[StrictStr, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# Cumulative MACs per image of exits 1..n: what every file that records them must hold.
ExitMacs = Annotated[list[Count], MinLen(1), AfterValidator(_increasing)]
Classes = Annotated[list[Text], MinLen(1), AfterValidator(_unique)]
# Pixel statistics on the 0..1 scale, as `erde train` records them: a mean of 1e30 or a std of
# 1e-300 would feed the model infinities, and its answers would be noise.
PixelMean = Annotated[Finite, Interval(ge=0, le=1)]
PixelStd = Annotated[Finite, Ge(MIN_STD), Le(1)]
# The share of the resized image's shorter side that evaluation's centre crop keeps.
CropFraction = Annotated[Finite, Interval(gt=0, le=1)]


class FieldProblem(ValueError):
    """What a check across fields raises: it names the field, as pydantic's own errors do."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field {field!r}: {problem}")
        self.field, self.problem = field, problem


def _field(loc: Sequence[int | str], rename: Callable[[str], str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return rename(text)


def one_line(path: Path | str, error: ValidationError, fix: str, rename=lambda f: f) -> str:
    """pydantic's first error as `FILE: field X: problem; fix` (its own text spans lines)."""
    first = error.errors(include_url=False)[0]
    loc, cause = first["loc"], first.get("ctx", {}).get("error")
    if first["type"] == "missing":
        problem = "missing"
    elif isinstance(cause, FieldProblem):
        loc, problem = (*loc, *cause.field.split(".")), cause.problem
    elif first["type"] == "value_error":
        problem = str(cause)
    else:
        problem = first["msg"][:1].lower() + first["msg"][1:]
        value = first.get("input")
        if value is None or isinstance(value, (str, int, float)):
            problem += f" (got {_short(value)})"
    field = _field(loc, rename)
    where = f"field {field!r}: " if field else ""
    return f"{path}: {where}{problem}; {fix}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_version(
    raw: Any,
    path: Path | str,
    current: int,
    migrations: Mapping[int, Callable[[dict], dict]],
    fix: str,
) -> dict:
    """`raw` in the current format: an older version migrated step by step (a file without a
    version is version 1), a newer or retired one refused with `fix`, the key removed."""
    if not isinstance(raw, dict):
        raise ErdeError(f"{path}: it does not hold a JSON object; {fix}")
    version = raw.get(VERSION_KEY, 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ErdeError(f"{path}: field {VERSION_KEY!r}: is not a whole number; {fix}")
    if version > current:
        raise ErdeError(
            f"{path} has format version {version}, this erde reads version {current}; a newer "
            f"erde wrote it: read it with that one, or {fix}"
        )
    if version < current and any(v not in migrations for v in range(version, current)):
        raise ErdeError(
            f"{path} has format version {version}, this erde reads version {current}; {fix}"
        )
    raw = {k: v for k, v in raw.items() if k != VERSION_KEY}
    for step in range(version, current):
        raw = migrations[step](raw)
    return raw


def validate(adapter: TypeAdapter[T], raw: Any, path: Path | str, fix: str, rename=None) -> T:
    """`raw` as the adapter's type; a one-line ErdeError for the first problem."""
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        raise ErdeError(one_line(path, exc, fix, rename or (lambda f: f))) from None
