"""A run's data from its config: the source, the seeded train/validation split, and the batches
the engine and the evaluation iterate."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erde.config import Config
from erde.data.batches import DeviceBatches
from erde.data.image_data import ImageData
from erde.data.sources import load_source
from erde.data.split import stratified_split
from erde.distributed import World
from erde.errors import ErdeError
from erde.model_info import DataInfo


@dataclass
class Split:
    """The data of one run: the source and the seeded train/validation indices."""

    data: ImageData
    train_idx: torch.Tensor
    val_idx: torch.Tensor

    @property
    def val(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.train_x[self.val_idx], self.data.train_y[self.val_idx]

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.test_x, self.data.test_y


def prepare_data(cfg: Config) -> Split:
    d = cfg.data
    data = load_source(d.source, d.root, download=d.download, verify=d.verify)
    val_size = int(d.val_size) if d.val_size >= 1 else float(d.val_size)
    train_idx, val_idx = stratified_split(data.train_y, val_size, cfg.train.seed)
    return Split(data, train_idx, val_idx)


def check_split(cfg: Config, split: Split) -> None:
    """Settings that only make sense against the data: each named with the number it must stay
    under, before a run folder exists (the batches would fail later with vaguer words)."""
    d, t = cfg.data, cfg.train
    n_train, n_val = len(split.train_idx), len(split.val_idx)
    if n_val == 0:
        raise ErdeError(
            f"data.val_size={d.val_size:g} of {n_train} training images gives an empty "
            "validation split, and thresholds are chosen on validation data; raise "
            "data.val_size (a count >= 1, or a fraction that holds at least one image)"
        )
    if t.batch_size > n_train:
        raise ErdeError(
            f"train.batch_size={t.batch_size} is larger than the {n_train} training images left "
            f"after data.val_size={d.val_size:g}; set train.batch_size to at most {n_train}"
        )
    size = min(split.data.input_size)
    if d.augment and d.crop_padding >= size:
        raise ErdeError(
            f"data.crop_padding={d.crop_padding} must be below the image size {size} (a "
            f"crop shifted that far shows no image at all); use at most {size - 1}, or "
            "data.augment=false"
        )


def data_info(data: ImageData) -> DataInfo:
    """What a model trained on `data` records about its input (the models take square images)."""
    height, width = data.input_size
    if height != width:
        raise ErdeError(
            f"{data.name} images are {height}x{width}; the models take square images, "
            "so resize the data set to a square size first"
        )
    return DataInfo(
        source=data.name,
        classes=list(data.classes),
        mean=list(data.mean),
        std=list(data.std),
        input_size=height,
        in_channels=data.in_channels,
    )


def train_batches(
    cfg: Config, split: Split, device: torch.device, world: World | None = None
) -> DeviceBatches:
    """This rank's training batches: its share of one seeded permutation, `batch_size / world`
    images a step, so a step of all ranks together sees the global `train.batch_size`."""
    world = world or World()
    t, data = cfg.train, split.data
    x_train, y_train = data.train_x[split.train_idx], data.train_y[split.train_idx]
    return DeviceBatches(
        x_train,
        y_train,
        batch_size=t.batch_size // world.size,
        mean=data.mean,
        std=data.std,
        device=device,
        shuffle=True,
        augment=cfg.data.augment,
        crop_padding=cfg.data.crop_padding,
        hflip=data.hflip,
        seed=t.seed,
        drop_last=len(y_train) > t.batch_size,
        channels_last=t.channels_last,
        rank=world.rank,
        world_size=world.size,
    )


def eval_batches(
    cfg: Config,
    split: Split,
    part: str,
    device: torch.device,
    world: World | None = None,
    *,
    channels_last: bool = False,
) -> DeviceBatches:
    """Plain (unaugmented, in order) batches of the `val` or `test` part; under several
    processes each rank takes every `world.size`-th image."""
    world = world or World()
    x, y = getattr(split, part)
    if len(y) == 0:
        raise ErdeError(
            f"the {part} split is empty (data.val_size={cfg.data.val_size:g}); thresholds are "
            "chosen on validation data, so raise data.val_size (a count >= 1, or a fraction "
            "that holds at least one image)"
        )
    share = slice(world.rank, None, world.size)
    return DeviceBatches(
        x[share],
        y[share],
        batch_size=cfg.train.eval_batch_size,
        mean=split.data.mean,
        std=split.data.std,
        device=device,
        channels_last=channels_last,
    )
