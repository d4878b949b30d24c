"""Ablation grids: lists of values for config keys, expanded into one named run per combination.

A grid is a mapping `key: [values]` (the `grid:` section of a reproduce preset, or `--grid
KEY=V1,V2,...` on the command line). Keys are `student.*` and `distill.*` scalars: the teacher and
the data are shared by every run of a study, so `teacher.*`, `data.*` and `evaluate.*` are not
gridded (train another study, or pass `--teacher`). A key expands only the methods whose loss
reads it (its record's `term`, `erde.config.method_keys`), so `distill.beta` adds `erde` runs and
leaves `kd` at one; a key whose record says it is not gridded (`distill.method`) is refused with
the record's reason.
Values are typed and checked by the schema like any override. A run's name is its method plus
every key whose value differs from the base config (`erde-beta0.3-entropy_exits-intermediate`),
so the combination equal to the base config is the plain `erde` run of an ungridded study.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from erde.config.method_keys import applies
from erde.config.methods import check_option, get_method, option_spec
from erde.config.records import Record
from erde.config.schema import ReproduceConfig, records, stage_config, structured, validate
from erde.errors import ErdeError

GRID_SECTIONS = ("student.", "distill.")
_SCALARS = (int, float, bool, str, type(None))


@dataclass(frozen=True)
class Variant:
    """One method with one combination of grid values: `config` is the study's config with
    `changes` applied (only the keys whose value differs from the base)."""

    method: str
    name: str
    changes: tuple[tuple[str, Any], ...]
    config: ReproduceConfig


def parse_grid_options(options: list[str]) -> dict[str, list[str]]:
    """`--grid KEY=V1,V2,...` options as a mapping; each key once, no blank value."""
    grid: dict[str, list[str]] = {}
    for text in options:
        key, sep, rest = text.partition("=")
        key, values = key.strip(), [v.strip() for v in rest.split(",")]
        if not sep or not key or not all(values):
            raise ErdeError(
                f"--grid {text!r} is not of the form KEY=V1,V2,... "
                "(e.g. --grid distill.beta=0.1,0.3,1)"
            )
        if key in grid:
            raise ErdeError(f"--grid {key} is given twice; list all its values in one option")
        grid[key] = values
    return grid


def _field_type(key: str) -> Any:
    """The schema's type of a dotted key, or None when the key does not exist."""
    cls: Any = ReproduceConfig
    for part in key.split("."):
        hints = typing.get_type_hints(cls) if isinstance(cls, type) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def _is_scalar(kind: Any) -> bool:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Optional[...]
        return all(_is_scalar(t) for t in typing.get_args(kind))
    return kind in _SCALARS


def check_key(key: str, table: dict[str, Record] | None = None) -> None:
    """Refuse a key a grid may not vary: one its record keeps fixed (`ungridded` says why), one
    outside `GRID_SECTIONS`, or a list. `table`: the key records (default: the schema's)."""
    record = (records() if table is None else table).get(key)
    if record is not None and not record.gridded:
        raise ErdeError(f"grid key {key} cannot be gridded: {record.ungridded}")
    if not key.startswith(GRID_SECTIONS):
        raise ErdeError(
            f"grid key {key}: only student.* and distill.* keys can be gridded, since the "
            "teacher, data and evaluation are shared by every run of a study; start another "
            "study (--out) for another value"
        )
    kind = _field_type(key)  # None: not in the schema, and the merge says so
    if kind is not None and not _is_scalar(kind):
        raise ErdeError(f"grid key {key} holds a list; grid keys take single values")


def typed_values(cfg: ReproduceConfig, key: str, items: list[str]) -> list[Any]:
    """Each value as the schema types it (one merge per value, so a message names it)."""
    check_key(key)
    base = OmegaConf.structured(cfg)
    values = []
    spec = option_spec(key)  # a method's own key: typed as its default
    for item in items:
        merged = structured(ReproduceConfig, [("the config", base), ("--grid", [f"{key}={item}"])])
        value = OmegaConf.select(merged, key)
        values.append(value if spec is None else check_option(key, value, spec))
    return list(dict.fromkeys(values))


def _base_value(base: Any, key: str) -> Any:
    """The study's value of a key: a method's own key not given is at its default."""
    value = OmegaConf.select(base, key)
    spec = option_spec(key)
    return spec.default if value is None and spec is not None else value


def _label(short: str, value: Any) -> str:
    """The part of a run's name for one grid value: `beta0.3`; a float `:g` would round to
    another value's label in full (`0.1234561`), and a text value becomes one safe name."""
    if isinstance(value, bool):
        return f"{short}-{str(value).lower()}"
    if isinstance(value, (int, float)):
        text = f"{value:g}"
        return f"{short}{text if float(text) == value else repr(value)}"
    return f"{short}-{_path_safe(str(value))}"


def _path_safe(text: str) -> str:
    """`text` as one folder name inside the study (no `/`, no `..`), told apart by a digest
    of the original when characters had to be replaced."""
    safe = re.sub(r"[^A-Za-z0-9_.+=-]", "_", text).lstrip(".")
    if safe == text:
        return text
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each key (`beta`), the whole key where two keys share their last part."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(keys, leaves, strict=True)}


def _with(cfg: ReproduceConfig, changes: tuple[tuple[str, Any], ...]) -> ReproduceConfig:
    c = OmegaConf.structured(cfg)
    for key, value in changes:
        OmegaConf.update(c, key, value)
    return OmegaConf.to_object(c)


def expand(cfg: ReproduceConfig) -> list[Variant]:
    """One variant per method and combination of the values that matter for it, each checked
    like an `erde train` config; without a grid, one variant per method; then one `static`
    variant per model of `static_models`."""
    values = {key: typed_values(cfg, key, items) for key, items in cfg.grid.items()}
    short = _short_names(list(values))
    base = OmegaConf.structured(cfg)
    variants: dict[str, Variant] = {}
    for method in cfg.methods:
        keys = [k for k in values if applies(k, method)]
        for combo in itertools.product(*(values[k] for k in keys)):
            changes = tuple(
                (k, v) for k, v in zip(keys, combo, strict=True) if v != _base_value(base, k)
            )
            name = "-".join([method, *(_label(short[k], v) for k, v in changes)])
            if name not in variants:
                variant = Variant(method, name, changes, _with(cfg, changes))
                teacher = "teacher" if get_method(method).needs_teacher else None
                validate(
                    stage_config(variant.config, "student", seed=0, method=method, teacher=teacher),
                    stage="student",
                )
                variants[name] = variant
    for model in cfg.static_models:
        variants.setdefault(f"static-{model}", static_variant(cfg, model))
    return list(variants.values())


def static_variant(cfg: ReproduceConfig, model: str) -> Variant:
    """The static baseline of one size: the student's stage with the model `model` and no
    early exits, trained by `static` (KD from the teacher's last exit); the grid leaves it be."""
    changes = (("student.model.name", model), ("student.model.exits", "[]"))
    variant = Variant("static", f"static-{model}", changes, _with(cfg, changes))
    validate(
        stage_config(variant.config, "student", seed=0, method="static", teacher="teacher"),
        stage="student",
    )
    return variant


__all__ = [
    "GRID_SECTIONS",
    "Variant",
    "check_key",
    "expand",
    "parse_grid_options",
    "static_variant",
    "typed_values",
]
