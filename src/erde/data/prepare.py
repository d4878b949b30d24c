"""A run's data from its config: the source, the seeded train/validation split, and the batches
the engine and the evaluation iterate.

An image folder is decoded into memory (`DeviceBatches`) or streamed from its files
(`StreamBatches`): `data.stream=always|never`, or `auto`, which streams a folder whose decoded
images would exceed `data.device_budget_gb` (`erde.data.budget`). Both take the same images in
the same steps and normalise them alike; streamed training crops ImageNet-style
(`erde.data.stream`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import torch

from erde.config.schema import Config
from erde.data.batches import DeviceBatches
from erde.data.budget import budget_bytes, decoded_bytes
from erde.data.image_data import ImageData, resized
from erde.data.image_files import ImageFiles, image_files
from erde.data.image_folder import folder_samples
from erde.data.sources import load_source
from erde.data.split import config_size, stratified_split, stratified_subset
from erde.data.stream import StreamBatches, default_workers
from erde.device import resolve_device
from erde.distributed import World
from erde.errors import ErdeError
from erde.run.model_info import DataInfo

log = logging.getLogger("erde.data")

Batches = DeviceBatches | StreamBatches


@dataclass
class Split:
    """The data of one run: the source (decoded, or listed for streaming) and the seeded
    train/validation indices."""

    data: ImageData | ImageFiles
    train_idx: torch.Tensor
    val_idx: torch.Tensor

    @property
    def streamed(self) -> bool:
        return isinstance(self.data, ImageFiles)

    @property
    def val(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._in_memory("val", self.val_idx)

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._in_memory("test", None)

    def _in_memory(self, part: str, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.data
        if isinstance(data, ImageFiles):
            raise ErdeError(
                f"{data.name}: this step needs the {part} images decoded in memory, but this run "
                "streams them from their files (data.stream); it does not take streamed data "
                "yet. Where the images share one size and fit in memory, set data.stream=never "
                "in the run's config.yaml"
            )
        if idx is None:
            return data.test_x, data.test_y
        return data.train_x[idx], data.train_y[idx]

    def files(self, part: str) -> tuple[list[str], torch.Tensor]:
        """Paths and labels of the `train`, `val` or `test` part of a streamed split."""
        data = self.data
        assert isinstance(data, ImageFiles)
        if part == "test":
            return data.test_paths, data.test_y
        idx = self.train_idx if part == "train" else self.val_idx
        return [data.train_paths[i] for i in idx.tolist()], data.train_y[idx]


def prepare_data(cfg: Config) -> Split:
    d = cfg.data
    data = load_data(cfg)
    train_idx, val_idx = stratified_split(
        data.train_y, config_size(d.val_size), cfg.train.seed, key="data.val_size"
    )
    if d.train_size is not None:  # a quick run on part of the data; validation stays whole
        size = config_size(d.train_size)
        train_idx = train_idx[
            stratified_subset(data.train_y[train_idx], size, cfg.train.seed, key="data.train_size")
        ]
        log.info("data.train_size=%g: training on %d images", d.train_size, len(train_idx))
    return Split(data, train_idx, val_idx)


def load_data(cfg: Config) -> ImageData | ImageFiles:
    """The source decoded into memory, or an image folder listed for streaming."""
    d = cfg.data
    test_size = None if d.test_size is None else config_size(d.test_size)
    if d.source == "imagefolder" and d.root and d.stream != "never":
        classes, splits = folder_samples(os.path.expanduser(d.root), test_size)
        if d.stream == "always" or _over_budget(cfg, splits):
            workers = default_workers() if d.workers is None else d.workers
            log.info("streaming the images from their files with %d worker(s)", workers)
            return image_files(
                classes, splits, size=d.image_size, mean=d.mean, std=d.std, workers=workers
            )
    data = load_source(d.source, d.root, download=d.download, verify=d.verify, test_size=test_size)
    if d.image_size is not None and data.input_size != (d.image_size, d.image_size):
        log.info(
            "resizing the %s images from %dx%d to %d", data.name, *data.input_size, d.image_size
        )
        _check_resized_size(cfg, data, d.image_size)
        data = resized(data, d.image_size)
    if d.mean is None or d.std is None:
        return data
    if len(d.mean) != data.in_channels:
        raise ErdeError(
            f"data.mean and data.std have {len(d.mean)} values but the {data.name} images have "
            f"{data.in_channels} channel(s); give one value per channel"
        )
    return replace(data, mean=tuple(d.mean), std=tuple(d.std))


def _check_resized_size(cfg: Config, data: ImageData, size: int) -> None:
    """Resized images stay in memory (on the training device): refuse what would not fit."""
    count = len(data.train_x) + len(data.test_x)
    need = count * size * size * data.in_channels
    have = budget_bytes(cfg.data.device_budget_gb, resolve_device(cfg.train.device))
    if need > have:
        raise ErdeError(
            f"data.image_size={size}: the {count} {data.name} images would take "
            f"{need / 1e9:.3g} GB resized, above the budget of {have / 1e9:.3g} GB "
            "(data.device_budget_gb); choose a smaller data.image_size, or stream an image "
            "folder from its files (data.stream=always)"
        )


def _over_budget(cfg: Config, splits: dict[str, list[tuple[str, int]]]) -> bool:
    """`data.stream=auto`: whether the folder decoded would exceed the budget (logged if so)."""
    paths = [p for part in splits.values() for p, _ in part]
    need = decoded_bytes(paths)
    have = budget_bytes(cfg.data.device_budget_gb, resolve_device(cfg.train.device))
    if need <= have:
        return False
    given = "data.device_budget_gb" if cfg.data.device_budget_gb is not None else "default"
    log.info(
        "data.stream=auto: the %d images take about %.3g GB decoded, above the budget of "
        "%.3g GB (%s)",
        *(len(paths), need / 1e9, have / 1e9, given),
    )
    return True


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
        subset = "" if d.train_size is None else f" and data.train_size={d.train_size:g}"
        raise ErdeError(
            f"train.batch_size={t.batch_size} is larger than the {n_train} training images left "
            f"after data.val_size={d.val_size:g}{subset}; set train.batch_size to at most "
            f"{n_train}"
        )
    size = min(split.data.input_size)
    if d.augment and not split.streamed and d.crop_padding >= size:
        raise ErdeError(
            f"data.crop_padding={d.crop_padding} must be below the image size {size} (a "
            f"crop shifted that far shows no image at all); use at most {size - 1}, or "
            "data.augment=false"
        )


def data_info(data: ImageData | ImageFiles, eval_crop: float = 1.0) -> DataInfo:
    """What a model trained on `data` records about its input (the models take square images)
    and evaluation's crop rule (`data.eval_crop`)."""
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
        eval_crop=float(eval_crop),
    )


def train_batches(
    cfg: Config, split: Split, device: torch.device, world: World | None = None
) -> Batches:
    """This rank's training batches: its share of one seeded permutation, `batch_size / world`
    images a step, so a step of all ranks together sees the global `train.batch_size`."""
    world = world or World()
    t, data = cfg.train, split.data
    n_train = len(split.train_idx)
    common = {
        "batch_size": t.batch_size // world.size,
        "mean": data.mean,
        "std": data.std,
        "device": device,
        "shuffle": True,
        "augment": cfg.data.augment,
        "hflip": data.hflip,
        "seed": t.seed,
        "drop_last": n_train > t.batch_size,
        "channels_last": t.channels_last,
        "rank": world.rank,
        "world_size": world.size,
    }
    if isinstance(data, ImageFiles):
        paths, y = split.files("train")
        return StreamBatches(paths, y, **common, **_stream_options(cfg, data))
    x_train, y_train = data.train_x[split.train_idx], data.train_y[split.train_idx]
    return DeviceBatches(x_train, y_train, crop_padding=cfg.data.crop_padding, **common)


def eval_batches(
    cfg: Config,
    split: Split,
    part: str,
    device: torch.device,
    world: World | None = None,
    *,
    channels_last: bool = False,
) -> Batches:
    """Plain (unaugmented, in order) batches of the `val` or `test` part; under several
    processes each rank takes every `world.size`-th image."""
    world = world or World()
    n = len(split.val_idx) if part == "val" else len(split.data.test_y)
    if n == 0:
        raise ErdeError(
            f"the {part} split is empty (data.val_size={cfg.data.val_size:g}); thresholds are "
            "chosen on validation data, so raise data.val_size (a count >= 1, or a fraction "
            "that holds at least one image)"
        )
    share = slice(world.rank, None, world.size)
    data = split.data
    common = {
        "batch_size": cfg.train.eval_batch_size,
        "mean": data.mean,
        "std": data.std,
        "device": device,
        "channels_last": channels_last,
    }
    if isinstance(data, ImageFiles):
        paths, y = split.files(part)
        return StreamBatches(paths[share], y[share], **common, **_stream_options(cfg, data))
    x, y = getattr(split, part)
    return DeviceBatches(x[share], y[share], **common)


def _stream_options(cfg: Config, data: ImageFiles) -> dict:
    d = cfg.data
    return {
        "channels": data.channels,
        "size": data.size,
        "eval_crop": d.eval_crop,
        "workers": default_workers() if d.workers is None else d.workers,
    }
