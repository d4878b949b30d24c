"""Which methods each config key matters for, read off the key's record (`Record.term`).

A grid over `distill.beta` adds runs only for methods whose loss has the entropy term, the tuner
searches only the keys a method's loss reads, and a comparison does not split a method's runs
on a loss option it never reads; every key without a term (`student.*`,
`distill.exit_weights`) matters for every method.
"""

from __future__ import annotations

from erde.config.methods import get_method
from erde.config.records import Record, record_of
from erde.config.schema import records


def applies(key: str, method: str, table: dict[str, Record] | None = None) -> bool:
    """Whether changing `key` (dotted, as a train or reproduce config spells it) changes what
    `method` trains; a key no record describes (an older version's) is assumed to."""
    record = record_of(records() if table is None else table, key)
    return record is None or record.term is None or get_method(method).reads(record.term)


__all__ = ["applies"]
