"""Which methods each loss key matters for, read off `erde.config.methods.METHOD_TABLE`.

A grid over `distill.beta` adds runs only for methods whose loss has the entropy term, and the
tuner searches only the keys a method's loss reads; every other key (`student.*`,
`distill.exit_weights`) matters for every method.
"""

from __future__ import annotations

from erde.config.methods import METHOD_TABLE

# Read by the KL term to the teacher (methods with a teacher).
KD_KEYS: tuple[str, ...] = ("distill.alpha", "distill.temperature", "distill.pairing")
# Read by the maximum-entropy term (methods with `entropy`).
ENTROPY_KEYS: tuple[str, ...] = ("distill.beta", "distill.entropy_term", "distill.entropy_exits")


def applies(key: str, method: str) -> bool:
    """Whether changing `key` (a dotted reproduce-config key) changes what `method` trains."""
    m = METHOD_TABLE[method]
    if key in ENTROPY_KEYS:
        return m.entropy
    if key in KD_KEYS:
        return m.needs_teacher
    return True


__all__ = ["ENTROPY_KEYS", "KD_KEYS", "applies"]
