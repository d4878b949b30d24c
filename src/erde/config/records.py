"""One record per config key, written once beside its dataclass field in `erde.config.schema`.

A record holds everything the program knows about a key besides its type and default: the help
line `erde config` prints, the allowed values or range validation checks, whether two runs that
differ in it are different experiments (`erde.evaluation.groups`), whether a grid or the tuner may
vary it (`erde.study.grid`, `erde.study.tune`) and which loss term reads it, hence which methods
it matters for (`erde.config.method_keys.applies`). A new key is one field with its record; every
consumer reads `erde.config.schema.records()`, and none keeps a table of its own.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass

# The loss term whose methods a key matters for: "teacher" (methods with a teacher), "kd" (any
# distillation, a teacher's or the student's own), "entropy", or a method's own name (its keys).
Term = str
_METADATA = "erde"


@dataclass(frozen=True)
class Range:
    """The finite numbers a key (or each item of a list key) accepts: low <= x (< x if
    `low_open`), and x <= high (< high if `high_open`) where `high` is set. `items` names what
    a list holds."""

    low: float
    high: float | None = None
    low_open: bool = False
    items: str = "values"
    high_open: bool = False

    def holds(self, x: float) -> bool:
        """Whether `x` is allowed (NaN and infinities never are; a whole number is compared
        exactly, however large)."""
        if not isinstance(x, int) and not math.isfinite(x):
            return False
        above = x > self.low if self.low_open else x >= self.low
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def rule(self) -> str:
        """The rule as messages state it: '> 0', '>= 0', 'in (0, 1]' or 'in [0, 1)'."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"


def _number(x: float) -> str:
    """A bound as written: 4294967295, not 4.29497e+09."""
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Search:
    """Where `erde tune` searches a key: floats in [low, high] (on a log scale where `log`), or,
    without bounds, every value its record allows (a key with choices)."""

    low: float | None = None
    high: float | None = None
    log: bool = False


POSITIVE, NON_NEGATIVE = Range(0, low_open=True), Range(0)
# What every random generator erde seeds accepts (NumPy's legacy ones stop at 2**32 - 1).
SEED = Range(0, 2**32 - 1, items="seeds")


@dataclass(frozen=True)
class Record:
    """What one config key means beyond its type.

    `choices` or `range`: the values validation accepts (neither: the type says it all).
    `experiment`: False where runs differing only in this key are seeds of one experiment
    (where data lives, speed and bookkeeping options). `ungridded`: why a grid or the tuner may
    not vary the key ('' where they may). `term`: the loss term that reads the key ("kd": the KL
    term of methods with a teacher; "entropy": the maximum-entropy term), None where every
    method's run reads it.
    """

    help: str
    choices: tuple[str, ...] | None = None
    range: Range | None = None
    experiment: bool = True
    ungridded: str = ""
    term: Term | None = None
    search: Search | None = None

    def __post_init__(self) -> None:
        if not self.help.strip():
            raise ValueError("a config key's record needs a help line")
        if self.choices is not None and self.range is not None:
            raise ValueError("a config key has allowed values or a range, not both")

    @property
    def gridded(self) -> bool:
        """Whether a grid or the tuner may vary the key."""
        return not self.ungridded

    def rule(self) -> str:
        """The allowed values as `erde config` prints them, or '' where the type says it all."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        return self.range.rule() if self.range is not None else ""


def key(
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    range: Range | None = None,
    experiment: bool = True,
    ungridded: str = "",
    term: Term | None = None,
    search: Search | None = None,
) -> dict[str, Record]:
    """A field's `metadata=`, holding its key's record: `field(default=..., metadata=key(...))`."""
    return {_METADATA: Record(help, choices, range, experiment, ungridded, term, search)}


def walk_records(schema: type, prefix: str = "") -> dict[str, Record]:
    """{dotted key: record} of every leaf field of a config dataclass, in field order; a field
    without a record is a programming error, refused here so no key ships undocumented."""
    hints = typing.get_type_hints(schema)
    table: dict[str, Record] = {}
    for f in dataclasses.fields(schema):
        name, kind = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(kind):
            table.update(walk_records(kind, name + "."))
        elif _METADATA in f.metadata:
            table[name] = f.metadata[_METADATA]
        else:
            raise TypeError(f"config key {name} has no record: give its field metadata=key(...)")
    return table


def record_of(table: dict[str, Record], name: str) -> Record | None:
    """The record of a dotted key, or of the key holding it (`model.options.width` is one of
    `model.options`); None for a key no schema has (a run of an older version)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        found = table.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None


__all__ = [
    "NON_NEGATIVE",
    "POSITIVE",
    "Range",
    "Record",
    "Search",
    "Term",
    "key",
    "record_of",
    "walk_records",
]
