"""Batches built on the training device from a uint8 copy that is moved there once.

Per-image PIL pipelines spend most of their time in Python; here a batch's crop, flip and
normalisation are a few tensor operations, and all randomness comes from (seed, epoch) so a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from erde.data.order import EpochOrder
from erde.data.pixels import Normalize
from erde.errors import ErdeError


class DeviceBatches:
    """Iterable of `(x float32 NCHW normalised, y int64)` batches, all on `device`.

    `augment` switches augmentation on: a random crop of the zero-padded image (`crop_padding`
    pixels each side; 0 disables it) and, if `hflip`, a horizontal flip with probability 1/2.
    Which images each step takes, on which rank, is `EpochOrder`'s (shared with `StreamBatches`).
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
        if crop_padding < 0:
            raise ErdeError(f"crop_padding must be 0 or more pixels, got {crop_padding}.")
        self.order = EpochOrder(len(x), batch_size, seed, shuffle, drop_last, rank, world_size)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.padding = crop_padding if augment else 0
        self.flip = augment and hflip
        self.channels_last = channels_last
        self.epoch = 0
        self.num_samples = self.order.per_rank

        self.x = x.to(self.device).permute(0, 3, 1, 2).contiguous()
        self.y = y.to(self.device)
        self._normalize = Normalize(mean, std, self.device)

    def __len__(self) -> int:
        return self.order.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's sample order, crop offsets and flips for the epoch (drawn on the CPU)."""
        gen = self.order.generator(self.epoch)
        order = self.order.global_order(gen)
        total = self.order.total
        shifts = (
            torch.randint(0, 2 * self.padding + 1, (total, 2), generator=gen)
            if self.padding
            else None
        )
        flips = torch.rand(total, generator=gen) < 0.5 if self.flip else None
        mine = self.order.mine
        return (
            mine(order),
            None if shifts is None else mine(shifts),
            None if flips is None else mine(flips),
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
        for part in self.order.step_slices():
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
