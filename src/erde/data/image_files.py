"""An image folder listed, not decoded: what streamed training reads (`erde.data.stream`).

The counterpart of `ImageData` for folders that are not decoded into memory: the same class
names, labels and statistics, file paths instead of pixels. Statistics not given in the config
(`data.mean`, `data.std`) are computed as the in-memory folder computes them (every training
image at its own size, `stats_from_counts`), at the cost of decoding the training images once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from erde.data.image_data import stats_from_counts
from erde.data.image_folder import decode_file
from erde.data.stream import pixel_counts

log = logging.getLogger("erde.data")


@dataclass(frozen=True)
class ImageFiles:
    """Paths and labels of a train/test pair, plus what training needs to know (as in
    `ImageData`). Every file is read as `channels` channels and fed at `size` x `size`."""

    train_paths: list[str]
    train_y: torch.Tensor
    test_paths: list[str]
    test_y: torch.Tensor
    classes: list[str]
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    channels: int
    size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of every image the model sees."""
        return self.size, self.size


def image_files(
    classes: list[str],
    splits: dict[str, list[tuple[str, int]]],
    *,
    size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    workers: int,
) -> ImageFiles:
    """`ImageFiles` of a listed folder (`folder_samples`). Without `size`, the shorter side of
    the first training image; without `mean`/`std`, one pass over the training images."""
    train, test = splits["train"], splits["test"]
    paths = [p for p, _ in train]
    if size is None:
        size = min(decode_file(paths[0]).shape[:2])
        log.info("data.image_size not set: %d, the shorter side of %s", size, paths[0])
    if mean is None or std is None:
        log.info(
            "data.mean/data.std not set: computing them over the %d training images (one pass; "
            "set both to skip it)",
            len(paths),
        )
        channels, counts = pixel_counts(paths, workers)
        mean, std = stats_from_counts(counts)
    else:
        channels = len(mean)
    return ImageFiles(
        train_paths=paths,
        train_y=torch.tensor([label for _, label in train], dtype=torch.int64),
        test_paths=[p for p, _ in test],
        test_y=torch.tensor([label for _, label in test], dtype=torch.int64),
        classes=list(classes),
        name="imagefolder",
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        hflip=True,
        channels=channels,
        size=size,
    )


__all__ = ["ImageFiles", "image_files"]
