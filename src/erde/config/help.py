"""`erde config`: a resolved config as YAML with every key's type, default, rule and help.

Every line reads the key's record (`erde.config.records`), written beside its field in the
schema: its help line and its rule (allowed values or range, the very ones validation checks).
A field without a record is refused when the records are collected, so no key ships undocumented.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from erde.config.records import Record
from erde.config.schema import load_config, load_reproduce_config, preset_names, records
from erde.errors import ErdeError


def _flow(value: Any) -> str:
    """One value in YAML flow style (`[0.5, 0.75]`, `null`, `cosine`)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()[1:-1]


def _type_name(field: dataclasses.Field) -> str:
    return field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")


def annotated_yaml(
    cfg: Any, prefix: str = "", indent: str = "", table: dict[str, Record] | None = None
) -> str:
    """`cfg` (a config dataclass) as YAML, each key followed by `# type, default, rule: help`
    from its record in `table` (default: the schema's records)."""
    table = records() if table is None else table
    defaults = type(cfg)()
    lines = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:")
            lines.append(annotated_yaml(value, key + ".", indent + "  ", table).rstrip("\n"))
            continue
        record = table[key]
        notes = [_type_name(f), f"default {_flow(getattr(defaults, f.name))}", record.rule()]
        note = ", ".join(n for n in notes if n)
        own = _own_keys(value, key, table)
        if own:  # a method's own keys (`distill.options`), each with its record
            lines.append(f"{indent}{f.name}:  # {note}: {record.help}")
            lines.extend(f"{indent}  {line}" for line in own)
            continue
        lines.append(f"{indent}{f.name}: {_flow(value)}  # {note}: {record.help}")
    return "\n".join(lines) + "\n"


def _own_keys(value: Any, key: str, table: dict[str, Record]) -> list[str]:
    """The lines of a dict key's entries that have records of their own (a method's keys)."""
    if not isinstance(value, dict):
        return []
    lines = []
    for name, item in value.items():
        record = table.get(f"{key}.{name}")
        if record is None:
            return []
        rule = f", {record.rule()}" if record.rule() else ""
        lines.append(f"{name}: {_flow(item)}  # {type(item).__name__}{rule}: {record.help}")
    return lines


def show_config(
    name: str | None, overrides: list[str] | None = None, *, reproduce: bool = False
) -> str:
    """What `erde config` prints: a train config, or a reproduce one where `reproduce` is set or
    `name` is a reproduce preset (the two kinds' preset names never overlap)."""
    if reproduce or name in preset_names("reproduce"):
        if name is None:
            raise ErdeError("--reproduce needs a preset name or a YAML file")
        return annotated_yaml(load_reproduce_config(name, overrides))
    return annotated_yaml(load_config(name, overrides))
