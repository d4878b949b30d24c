"""Batches decoded from image files by `DataLoader` workers: data sets larger than memory.

`StreamBatches` gives the images of `DeviceBatches` in the same steps (one `EpochOrder`), decoded
by the one decoder (`erde.data.pixels.decode_image`, through `decode_file`) and normalised by
the one `Normalize` on the training device. Training crops ImageNet-style: torchvision's
`RandomResizedCrop` to the input size, then (where mirrored images keep their class) a
horizontal flip; evaluation resizes the shorter side to size / eval_crop and crops the centre
(`erde.data.decode.resize_crop`, Pillow's antialiased bilinear filter, as `erde infer` does).
Each image's crop and flip come from a seed drawn for its position in the epoch's order, so the
batches are a function of (seed, epoch) whatever the number of workers, and a resumed run sees
the batches it would have seen.

torchvision is imported where it is used: importing it takes seconds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from erde.data.decode import resize_crop
from erde.data.image_folder import decode_file
from erde.data.order import EpochOrder
from erde.data.pixels import Normalize
from erde.device import cores
from erde.errors import ErdeError

_SEED_HIGH = 2**63 - 1


def default_workers() -> int:
    """Decoding processes per training process when `data.workers` is not set: the cores this
    process may use, shared among the processes torchrun started on this machine, one left for
    the training loop itself (at least one worker)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(16, cores() // max(1, local) - 1))


def train_transform(size: int, hflip: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 C x H x W -> C x size x size: a random crop of 8 % to 100 % of the area with an
    aspect ratio in [3/4, 4/3], resized (antialiased), then mirrored with probability 1/2."""
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(size, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def eval_transform(size: int, crop: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 C x H x W -> C x size x size by `erde.data.decode.resize_crop`, the one rule
    `erde infer` and an export's manifest follow too: the shorter side resized to
    round(size / crop), then the centre crop (crop 0.875 at size 224: resize to 256, crop 224).
    An image whose shorter side is already `size` is left as it is at crop 1."""

    def transform(x: torch.Tensor) -> torch.Tensor:
        pixels = resize_crop(np.ascontiguousarray(x.permute(1, 2, 0).numpy()), size, crop)
        return _tensor(pixels).permute(2, 0, 1)

    return transform


class _Files(Dataset):
    """Item (index, seed) -> (uint8 C x size x size, label), or the one-line message of a file
    that does not decode (raised in the training process, not as a worker's traceback)."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: torch.Tensor,
        channels: int,
        transform: Callable[[torch.Tensor], torch.Tensor],
        random: bool,
    ) -> None:
        # One numpy buffer, not a list of str: workers forked from a process holding a million
        # Python strings would copy them page by page as their reference counts change.
        self.paths = np.array([os.fsencode(p) for p in paths])
        self.labels = labels.numpy()
        self.channels, self.transform, self.random = channels, transform, random

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int] | str:
        index, seed = item
        try:
            pixels = decode_file(os.fsdecode(self.paths[index]), self.channels)
        except ErdeError as exc:
            return str(exc)
        x = _tensor(pixels).permute(2, 0, 1)
        if self.random:
            with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
                torch.manual_seed(seed)
                x = self.transform(x)
        else:
            x = self.transform(x)
        return x, int(self.labels[index])


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    """Pillow's pixels are read-only; torch wants to own writable memory."""
    return torch.from_numpy(np.require(pixels, requirements="W"))


def _collate(
    items: list[tuple[torch.Tensor, int] | str],
) -> tuple[torch.Tensor, torch.Tensor] | str:
    for item in items:
        if isinstance(item, str):
            return item
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


class _Steps(Sampler):
    """Each step's (image index, augmentation seed) pairs: `EpochOrder`'s indices, then one seed
    per position drawn from the same (seed, epoch) stream."""

    def __init__(self, order: EpochOrder) -> None:
        self.order, self.epoch = order, 0

    def __len__(self) -> int:
        return self.order.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = self.order.generator(self.epoch)
        indices = self.order.mine(self.order.global_order(gen))
        seeds = self.order.mine(torch.randint(_SEED_HIGH, (self.order.total,), generator=gen))
        for part in self.order.step_slices():
            yield list(zip(indices[part].tolist(), seeds[part].tolist(), strict=True))


class StreamBatches:
    """Iterable of `(x float32 NCHW normalised, y int64)` batches on `device`, decoded from
    `paths` by `workers` processes (0: in this one) as the steps come.

    The options mean what `DeviceBatches`' do; `augment` is the ImageNet-style crop and flip
    (module doc) and without it every image goes through the evaluation resize and centre crop.
    `channels`: what every file is converted to (1 grey, 3 colour); `size`: the model's input.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        channels: int,
        size: int,
        device: str | torch.device = "cpu",
        shuffle: bool = False,
        augment: bool = False,
        hflip: bool = False,
        eval_crop: float = 1.0,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
    ) -> None:
        if labels.dtype != torch.int64 or labels.shape != (len(paths),):
            raise ValueError(f"labels must be int64 of shape ({len(paths)},), got {labels.shape}")
        if not len(mean) == len(std) == channels:
            raise ValueError(f"mean/std need {channels} values, got {len(mean)}/{len(std)}")
        self.order = EpochOrder(len(paths), batch_size, seed, shuffle, drop_last, rank, world_size)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.num_samples = self.order.per_rank
        self.channels_last = channels_last
        self._steps = _Steps(self.order)
        transform = train_transform(size, hflip) if augment else eval_transform(size, eval_crop)
        self._loader = DataLoader(
            _Files(paths, labels, channels, transform, random=augment),
            batch_sampler=self._steps,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            generator=torch.Generator(),  # the loader's own draws leave the caller's stream alone
        )
        self._normalize = Normalize(mean, std, self.device)

    def __len__(self) -> int:
        return self.order.steps

    @property
    def epoch(self) -> int:
        return self._steps.epoch

    def set_epoch(self, epoch: int) -> None:
        self._steps.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._loader:
            if isinstance(batch, str):
                raise ErdeError(batch)
            xb, yb = batch
            out = self._normalize(xb.to(self.device, non_blocking=True))
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, yb.to(self.device, non_blocking=True)


class _Counts(Dataset):
    """Item i -> C x 256 counts of each pixel value of file i at its own size and channels."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = np.array([os.fsencode(p) for p in paths])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | str:
        try:
            pixels = decode_file(os.fsdecode(self.paths[i]))
        except ErdeError as exc:
            return str(exc)
        x = _tensor(pixels).reshape(-1, pixels.shape[2])
        return torch.stack([torch.bincount(x[:, c], minlength=256) for c in range(x.shape[1])])


def pixel_counts(paths: Sequence[str], workers: int) -> tuple[int, torch.Tensor]:
    """(channels, C x 256 counts) over every file: 3 channels when any file is colour, and then
    each grey file counts in all three, as the in-memory folder repeats grey into R, G and B."""
    loader = DataLoader(
        _Counts(paths),
        batch_size=64,
        num_workers=workers,
        collate_fn=list,
        generator=torch.Generator(),
    )
    grey = torch.zeros(1, 256, dtype=torch.int64)
    colour = torch.zeros(3, 256, dtype=torch.int64)
    any_colour = False
    for items in loader:
        for item in items:
            if isinstance(item, str):
                raise ErdeError(item)
            if len(item) == 1:
                grey += item
            else:
                colour += item
                any_colour = True
    return (3, colour + grey) if any_colour else (1, grey)


__all__ = ["StreamBatches", "default_workers", "eval_transform", "pixel_counts", "train_transform"]
