"""Which runs are seeds of one experiment: the grouping rule of `erde compare`.

Two runs belong together when they have the same method and model and agree on every config key
that defines an experiment; only their seeds may differ. Each key's record, beside its field in
`erde.config.schema`, says whether it does (`experiment`): the seed (counted, not grouped), the
method and model name (already in the label), where data, teacher and caches live, and speed or
bookkeeping options that leave the trained model the same up to float rounding do not. A key
that differs anywhere among the compared runs names the group (`erde (resnet8),
distill.beta=0.3`), so an ablation grid is never averaged into one row. Two runs of one seed in
one group are refused: averaging them would count one seed twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from erde.config.method_keys import applies
from erde.config.methods import methods_table
from erde.config.records import Record, record_of
from erde.config.schema import records
from erde.errors import ErdeError


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}; lists become tuples (comparable, hashable)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


def _experiment(key: str, table: dict[str, Record]) -> bool:
    """Whether runs differing in `key` are different experiments (unknown keys are)."""
    record = record_of(table, key)
    return record is None or record.experiment


def experiment_keys(
    config: dict[str, Any], method: str, table: dict[str, Record] | None = None
) -> dict[str, Any]:
    """The config keys (dotted) that make a run of `method` the experiment it is: a loss option
    the method does not read (docs/method.md, "Losses") cannot make its runs differ. `table`:
    the key records (default: the schema's)."""
    table = records() if table is None else table
    known = method in methods_table()
    return {
        k: v
        for k, v in _flatten(config).items()
        if _experiment(k, table) and (not known or applies(k, method, table))
    }


def _text(value: Any) -> str:
    """A value as a `key=value` override would spell it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return str(value)


def differing_keys(keys: Sequence[dict[str, Any]]) -> list[str]:
    """The keys on which runs that have them disagree, in first-seen order.

    A key a run lacks (its method does not use it, or an older version did not record it) is
    compared among the runs that have it.
    """
    values: dict[str, set[str]] = {}
    for run in keys:
        for k, v in run.items():
            values.setdefault(k, set()).add(_text(v))
    return [k for k, seen in values.items() if len(seen) > 1]


def group_label(method: str, model: str, keys: dict[str, Any], differing: Sequence[str]) -> str:
    """`method (model)` plus `key=value` for every differing key this run has."""
    settings = [f"{k}={_text(keys[k])}" for k in differing if k in keys]
    return ", ".join([f"{method} ({model})", *settings])


def check_seeds(
    label: str,
    runs: Sequence[tuple[str, int, dict[str, Any]]],
    table: dict[str, Record] | None = None,
) -> None:
    """Refuse two runs of one seed in one group; `runs`: (run folder, seed, resolved config)."""
    table = records() if table is None else table
    seen: dict[int, tuple[str, dict[str, Any]]] = {}
    for run, seed, config in runs:
        if seed not in seen:
            seen[seed] = (run, config)
            continue
        other, other_config = seen[seed]
        a, b = _flatten(other_config), _flatten(config)
        only = [
            k
            for k in sorted(a.keys() | b.keys())
            if not _experiment(k, table) and a.get(k) != b.get(k)
        ]
        differ = f" (they differ only in {', '.join(only)})" if only else ""
        raise ErdeError(
            f"runs {other} and {run} are both seed {seed} of '{label}'{differ}; a comparison "
            "averages seeds, not repeats: compare only one of them, or give them distinct seeds"
        )
