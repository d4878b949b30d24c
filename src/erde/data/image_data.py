"""The one in-memory form every data source produces, and the checks that make it trustworthy."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from erde.data.decode import resize_crop
from erde.errors import ErdeError


@dataclass(frozen=True)
class ImageData:
    """A labelled train/test pair of uint8 NHWC image tensors plus what training needs to know.

    `mean`/`std` are per channel on the 0..1 scale; `hflip` says whether mirrored images are
    still valid members of their class (true for objects, false for digits).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[3])

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return int(self.train_x.shape[1]), int(self.train_x.shape[2])


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std on the 0..1 scale of a uint8 NHWC tensor.

    A 256-bin histogram per channel gives exact sums without a float copy of the whole set.
    """
    counts = torch.stack(
        [torch.bincount(x[..., c].reshape(-1), minlength=256) for c in range(x.shape[3])]
    )
    return stats_from_counts(counts)


def stats_from_counts(counts: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and (population) std on the 0..1 scale from C x 256 pixel-value counts: the one
    formula for images in memory and images streamed from files."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in counts.to(torch.float64):
        p = channel / channel.sum()
        mean = float((p * levels).sum())
        var = float((p * (levels - mean) ** 2).sum())
        means.append(mean)
        stds.append(var**0.5 or 1.0)  # a constant channel: nothing to scale, avoid 0/0
    return tuple(means), tuple(stds)


def _labels(y: np.ndarray, split: str, n: int, name: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        raise ErdeError(
            f"{name}: {split} labels have dtype {y.dtype}; labels must be integers "
            "(class indices 0..K-1). Store them as an integer array."
        )
    if y.ndim == 2 and y.shape[1] == 1:  # a column, as .mat files store them
        y = y[:, 0]
    if y.ndim != 1:
        raise ErdeError(
            f"{name}: {split} labels have shape {y.shape}; expected one label per image "
            "(a 1-D array). Flatten them before saving."
        )
    if len(y) != n:
        raise ErdeError(
            f"{name}: {split} has {n} images but {len(y)} labels; every image needs exactly one "
            "label. Fix the file so both counts agree."
        )
    if y.dtype.kind == "u" and len(y) and y.max() > np.iinfo(np.int64).max:
        raise ErdeError(
            f"{name}: {split} labels contain {y.max()}, beyond the int64 range (a negative "
            "label stored unsigned wraps around to such a value); labels must be class indices "
            "0..K-1. Remap them."
        )
    if y.dtype.kind == "i" and len(y) and y.min() < 0:
        raise ErdeError(
            f"{name}: {split} labels contain the negative value {y.min()}; labels must be "
            "class indices 0..K-1. Remap them."
        )
    return torch.from_numpy(y.astype(np.int64))


def _images(x: np.ndarray, split: str, name: str) -> torch.Tensor:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ErdeError(
            f"{name}: {split} images have dtype {x.dtype}; expected uint8 pixels 0..255. "
            "Convert them (e.g. (x * 255).round().astype('uint8') for 0..1 floats)."
        )
    if x.ndim != 4 or x.shape[3] not in (1, 3) or min(x.shape) == 0:
        raise ErdeError(
            f"{name}: {split} images have shape {x.shape}; expected a non-empty "
            "N x H x W x C array with C = 1 (grayscale) or 3 (RGB). Reorder the axes to NHWC."
        )
    return torch.from_numpy(np.ascontiguousarray(x))


def _class_names(
    name: str, classes: Sequence[str] | None, train_y: torch.Tensor, top: int
) -> list[str]:
    """The class names. Without names the classes are 0..max label, so each must have training
    images (checked before a list of K names is built: a stray label of 10**12 must not
    allocate 10**12); named classes may lack images (a small subset of a named data set)."""
    if classes is not None:
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            twice = sorted({c for c in classes if classes.count(c) > 1})
            raise ErdeError(
                f"{name}: the class names list {', '.join(twice)} more than once; give each "
                "class its own name"
            )
        if top >= len(classes):
            raise ErdeError(
                f"{name}: label {top} is out of range for {len(classes)} classes (valid: 0.."
                f"{len(classes) - 1}); fix the labels or list every class name."
            )
    if classes is not None:
        return classes
    present = torch.unique(train_y).tolist()
    count = top + 1
    if len(present) < count:
        absent = sorted(set(range(min(count, len(present) + 6))) - set(present))[:5]
        raise ErdeError(
            f"{name}: {count} classes (labels 0..{count - 1}) but the train split has images "
            f"of only {len(present)} of them (none of label {', '.join(map(str, absent))}"
            f"{', ...' if count - len(present) > len(absent) else ''}); labels must be class "
            "indices 0..K-1 and every class needs training images. Remap the labels."
        )
    return [str(k) for k in range(count)]


def build_image_data(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    classes: Sequence[str] | None,
    hflip: bool,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> ImageData:
    """Validate (images, labels) numpy pairs from any source and wrap them as tensors, so
    every source's bad file gets the same checks and messages.

    Without `classes`, the class count is the largest label + 1 and names are the indices.
    Without `stats`, mean/std are computed from the train split.
    """
    train_x, test_x = _images(train[0], "train", name), _images(test[0], "test", name)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ErdeError(
            f"{name}: train images are {tuple(train_x.shape[1:])} (H, W, C) but test images are "
            f"{tuple(test_x.shape[1:])}; both splits must share one image size and channel count."
        )
    train_y = _labels(train[1], "train", len(train_x), name)
    test_y = _labels(test[1], "test", len(test_x), name)
    classes = _class_names(name, classes, train_y, max(int(train_y.max()), int(test_y.max())))
    mean, std = stats if stats is not None else channel_stats(train_x)
    if len(mean) != train_x.shape[3]:
        raise ErdeError(
            f"{name}: images have {train_x.shape[3]} channels but the source's mean/std have "
            f"{len(mean)}; convert the images to the source's channel count."
        )
    return ImageData(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=classes,
        name=name,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        hflip=hflip,
    )


def resized(data: ImageData, size: int) -> ImageData:
    """Every image's shorter side resized to `size` (antialiased), then the centre square cut:
    `erde.data.decode.resize_crop` at crop 1, the rule streamed evaluation, `erde infer` and an
    export's manifest follow, done once for data in memory. The mean/std stay the source's
    (resizing hardly moves them)."""
    if data.input_size == (size, size):
        return data

    def apply(images: torch.Tensor) -> torch.Tensor:
        out = np.stack([resize_crop(np.ascontiguousarray(x), size) for x in images.numpy()])
        return torch.from_numpy(out)

    return dataclasses.replace(data, train_x=apply(data.train_x), test_x=apply(data.test_x))
