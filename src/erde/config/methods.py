"""The training methods and the loss options: one table for the loss, the config and `reproduce`.

A method is fully described by which terms of the loss it uses (docs/method.md, "Losses"): every
method has the label cross-entropy; a method with a teacher adds the KL term on every sample
(`kd`) or only where the paired teacher exit is right (`kd-masked`, `erde`); `erde` also adds the
maximum-entropy term where that teacher exit is wrong. Adding a method is one row here plus its
term in `erde.distill.losses`, and the config schema, `erde reproduce` and the messages follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KDWhere = Literal["all", "teacher-right"]


@dataclass(frozen=True)
class Method:
    """What one method trains on; the engine and the config ask this, never the method's name."""

    name: str
    # Where the KL term to the teacher's softened outputs applies; None: no teacher at all.
    kd: KDWhere | None = None
    # The maximum-entropy term on samples whose paired teacher exit is wrong.
    entropy: bool = False
    # A student of the protocol (`erde reproduce` trains one per listed method); False: the teacher.
    student: bool = True

    @property
    def needs_teacher(self) -> bool:
        """Whether training needs a finished teacher run (`distill.teacher`)."""
        return self.kd is not None


METHOD_TABLE: dict[str, Method] = {
    m.name: m
    for m in (
        Method("teacher", student=False),
        Method("ce"),
        Method("kd", kd="all"),
        Method("kd-masked", kd="teacher-right"),
        Method("erde", kd="teacher-right", entropy=True),
    )
}
METHODS: tuple[str, ...] = tuple(METHOD_TABLE)
STUDENT_METHODS: tuple[str, ...] = tuple(n for n, m in METHOD_TABLE.items() if m.student)
TEACHER_METHODS: tuple[str, ...] = tuple(n for n, m in METHOD_TABLE.items() if m.needs_teacher)

# The loss's options (docs/method.md, "Losses"); `erde.distill.losses` implements each one.
PAIRINGS: tuple[str, ...] = ("same", "depth", "final")
ENTROPY_TERMS: tuple[str, ...] = ("uniform-ce", "neg-entropy")
ENTROPY_EXITS: tuple[str, ...] = ("all", "intermediate")


def or_list(names: tuple[str, ...] | list[str]) -> str:
    """'a, b or c': how messages offer a choice among names."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


__all__ = [
    "ENTROPY_EXITS",
    "ENTROPY_TERMS",
    "METHODS",
    "METHOD_TABLE",
    "PAIRINGS",
    "STUDENT_METHODS",
    "TEACHER_METHODS",
    "Method",
    "or_list",
]
