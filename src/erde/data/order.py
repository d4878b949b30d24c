"""Which images each step of an epoch takes on one rank: the one seeded order that device-resident
batches (`DeviceBatches`) and streamed ones (`StreamBatches`) share, so the two give a run the
same images in the same batches, and a resumed run the batches it would have had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from erde.errors import ErdeError


@dataclass(frozen=True)
class EpochOrder:
    """`n` images in steps of `batch_size` per rank; all randomness from (seed, epoch).

    Every rank draws the same permutation (or takes 0..n-1 without `shuffle`), pads it by
    wrapping around (or truncates it with `drop_last`) to a multiple of `world_size`, and takes
    `rank::world_size`.
    """

    n: int
    batch_size: int
    seed: int = 0
    shuffle: bool = False
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        if self.batch_size < 1:
            raise ErdeError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.steps == 0:
            raise ErdeError(
                f"{self.n} samples over {self.world_size} rank(s) give {self.per_rank} per rank, "
                f"fewer than batch_size {self.batch_size} with drop_last: no batch at all. "
                "Lower batch_size."
            )

    @property
    def per_rank(self) -> int:
        n, w = self.n, self.world_size
        return n // w if self.drop_last else math.ceil(n / w)

    @property
    def total(self) -> int:
        """Positions of the padded (or truncated) global order, over all ranks."""
        return self.per_rank * self.world_size

    @property
    def steps(self) -> int:
        per_rank, b = self.per_rank, self.batch_size
        return per_rank // b if self.drop_last else math.ceil(per_rank / b)

    def generator(self, epoch: int) -> torch.Generator:
        """The epoch's random stream: the order is its first draw; the batch source may draw its
        augmentation from it next."""
        seed = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(seed))

    def global_order(self, gen: torch.Generator) -> torch.Tensor:
        """The `total` image indices of all ranks, drawn first from `generator(epoch)`."""
        order = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        return order.repeat(math.ceil(self.total / self.n))[: self.total]

    def mine(self, per_position: torch.Tensor) -> torch.Tensor:
        """This rank's share of anything drawn per global position."""
        return per_position[self.rank :: self.world_size]

    def step_slices(self) -> list[slice]:
        """The positions in this rank's share that make up each step."""
        b = self.batch_size
        return [slice(s, s + b) for s in range(0, self.steps * b, b)]


__all__ = ["EpochOrder"]
