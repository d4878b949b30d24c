"""Batches built on the training device from a uint8 copy that is moved there once.

Per-image PIL pipelines spend most of their time in Python; here a batch's crop, flip and
normalisation are a few tensor operations, and all randomness comes from (seed, epoch) so a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from erde.data.pixels import Normalize
from erde.errors import ErdeError


class DeviceBatches:
    """Iterable of `(x float32 NCHW normalised, y int64)` batches, all on `device`.

    `augment` switches augmentation on: a random crop of the zero-padded image (`crop_padding`
    pixels each side; 0 disables it) and, if `hflip`, a horizontal flip with probability 1/2.
    With `world_size` > 1 every rank draws the same permutation, pads it by wrapping around (or
    truncates it with `drop_last`) to a multiple of `world_size`, and takes `rank::world_size`.
    Call `set_epoch` before each pass; without it every pass repeats epoch 0.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "cpu",
        shuffle: bool = False,
        augment: bool = False,
        crop_padding: int = 4,
        hflip: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"x must be a uint8 N x H x W x C tensor, got {x.dtype} {x.shape}")
        if y.dtype != torch.int64 or y.shape != (len(x),):
            raise ValueError(f"y must be int64 of shape ({len(x)},), got {y.dtype} {y.shape}")
        if not len(mean) == len(std) == x.shape[3]:
            raise ValueError(f"mean/std need {x.shape[3]} values, got {len(mean)}/{len(std)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if batch_size < 1:
            raise ErdeError(f"batch_size must be at least 1, got {batch_size}.")
        if crop_padding < 0:
            raise ErdeError(f"crop_padding must be 0 or more pixels, got {crop_padding}.")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.padding = crop_padding if augment else 0
        self.flip = augment and hflip
        self.channels_last = channels_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

        self.x = x.to(self.device).permute(0, 3, 1, 2).contiguous()
        self.y = y.to(self.device)
        n = len(x)
        per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        self._total = per_rank * world_size
        self.num_samples = per_rank
        self._batches = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
        if self._batches == 0:
            raise ErdeError(
                f"{n} samples over {world_size} rank(s) give {per_rank} per rank, fewer than "
                f"batch_size {batch_size} with drop_last: no batch at all. Lower batch_size."
            )
        self._normalize = Normalize(mean, std, self.device)

    def __len__(self) -> int:
        return self._batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's sample order, crop offsets and flips for the epoch (drawn on the CPU)."""
        seed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(seed))
        n = len(self.x)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.repeat(math.ceil(self._total / n))[: self._total]
        shifts = (
            torch.randint(0, 2 * self.padding + 1, (self._total, 2), generator=gen)
            if self.padding
            else None
        )
        flips = torch.rand(self._total, generator=gen) < 0.5 if self.flip else None
        mine = slice(self.rank, None, self.world_size)
        return (
            order[mine],
            None if shifts is None else shifts[mine],
            None if flips is None else flips[mine],
        )

    def _augment(
        self, xb: torch.Tensor, shifts: torch.Tensor | None, flips: torch.Tensor | None
    ) -> torch.Tensor:
        """Crop and flip the whole batch with one gather: output pixel (i, j) of image b is
        padded pixel (rows[b, i], cols[b, j]), read through a flat per-image index."""
        b, c, h, w = xb.shape
        rows = torch.arange(h, device=xb.device).expand(b, h)
        cols = torch.arange(w, device=xb.device).expand(b, w)
        if shifts is not None:
            p = self.padding
            xb = F.pad(xb, (p, p, p, p))
            rows = rows + shifts[:, :1]
            cols = cols + shifts[:, 1:]
        if flips is not None:
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        flat = rows[:, :, None] * xb.shape[3] + cols[:, None, :]  # b x h x w
        index = flat.view(b, 1, h * w).expand(b, c, h * w)
        return xb.reshape(b, c, -1).gather(2, index).view(b, c, h, w)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, shifts, flips = (None if t is None else t.to(self.device) for t in self._plan())
        for start in range(0, self._batches * self.batch_size, self.batch_size):
            part = slice(start, start + self.batch_size)
            idx = order[part]
            xb = self.x[idx]
            if shifts is not None or flips is not None:
                xb = self._augment(
                    xb,
                    None if shifts is None else shifts[part],
                    None if flips is None else flips[part],
                )
            out = self._normalize(xb)
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, self.y[idx]
