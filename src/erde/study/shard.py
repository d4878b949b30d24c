"""`--shard I/N`: one of N slices of a study's run list, for N processes on a shared folder.

Slices are 1-based (`1/4` .. `4/4`, as a SLURM array `--array=1-4` numbers its tasks) and taken
round-robin (run k goes to slice k mod N), so every slice gets a mix of methods and seeds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from erde.errors import ErdeError

T = TypeVar("T")
_FORM = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    def pick(self, items: Sequence[T]) -> list[T]:
        """This slice's items, in their order."""
        return list(items[self.index - 1 :: self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """`I/N` with 1 <= I <= N; ErdeError naming the fix otherwise."""
    match = _FORM.fullmatch(text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ErdeError(
            f"--shard {text}: give I/N with 1 <= I <= N, e.g. --shard 1/4 .. --shard 4/4 "
            "(slices are numbered from 1)"
        )
    return Shard(int(match.group(1)), int(match.group(2)))


__all__ = ["Shard", "parse_shard"]
