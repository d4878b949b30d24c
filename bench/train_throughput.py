"""Images/s of an ERDE distillation step: the training engine against its zero-data-cost bound and
against a torchvision DataLoader + PIL pipeline.

The `cifar10-cpu` pair: teacher CIFAR ResNet-20, student CIFAR ResNet-8 (exits after stages 1
and 2), batch 128, channels_last, fp32 (`--precision bf16` for GPUs), the `erde` loss. Three ways
of running K steps:

(a) engine   `erde.train.engine.train_epoch` on `DeviceBatches` with augmentation (crop + flip on
             device), with all its bookkeeping (loss components, non-finite check, progress),
             stopped after K steps;
(b) bound    the bare step (teacher forward, student forward + backward, SGD) on K batches built
             before the clock starts: what (a) would reach if data and bookkeeping were free;
(c) PIL      the same bare step fed by a torchvision `DataLoader` over PIL images through
             RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize.

The teacher has random weights (the step costs the same whatever it learnt). Every variant runs
once to warm up, then `--repeats` times round-robin so all meet the same background load; the
median is kept. Run from the repository root:

    python bench/train_throughput.py --root ../shared/data/cifar10 --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from pil_baseline import cifar_images
from torch.utils.data import DataLoader, RandomSampler

from erde.config.schema import load_config
from erde.data.prepare import data_info, prepare_data
from erde.models import create_model
from erde.models.macs import exit_macs, static_macs
from erde.run import checkpoint as ckpt
from erde.run.model_info import ModelInfo
from erde.train.engine import setup, train_epoch

DEFAULT_ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")


class FirstSteps:
    """The engine's batches, cut to the first `steps` of an epoch (the engine loop is unchanged)."""

    def __init__(self, batches, steps: int) -> None:
        self.batches, self.steps, self.device = batches, steps, batches.device

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.batches), self.steps)


def random_teacher(data, folder: str) -> None:
    """A ResNet-20 teacher run folder with untrained weights, readable as a teacher."""
    torch.manual_seed(0)
    net = create_model("resnet20", num_classes=data.num_classes, input_size=32)
    info = ModelInfo(
        arch=net.arch,
        exit_macs=exit_macs(net),
        static_macs=static_macs(net),
        data=data_info(data),
        finished=True,
    )
    ckpt.save_weights(Path(folder) / "model.safetensors", net, info)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="CIFAR-10 folder (npz or official)")
    parser.add_argument("--steps", type=int, default=12, help="K: steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for (c)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = os.getloadavg()[0]

    folder = tempfile.mkdtemp(prefix="erde-bench-teacher-")
    overrides = [
        "data.source=cifar10",
        f"data.root={args.root}",
        "model.name=resnet8",
        "train.batch_size=128",
        "train.channels_last=true",
        f"train.device={args.device}",
        f"train.precision={args.precision}",
        "distill.method=erde",
        f"distill.teacher={folder}",
        "distill.teacher_cache=false",
    ]
    cfg = load_config(None, overrides)
    split = prepare_data(cfg)
    data = split.data
    random_teacher(data, folder)
    torch.manual_seed(0)
    parts = setup(cfg, device, progress=False).parts  # the engine's own model, loss, optimiser
    net, loss_fn, batches = parts.model, parts.loss_fn, parts.batches
    teacher = parts.teacher.teacher  # the bare forward pass (the cache is off for this bench)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with parts.autocast():  # teacher first, as in the engine
            teacher_logits = teacher(x)
            result = loss_fn(net(x), y, teacher_logits)
        parts.optimizer.zero_grad(set_to_none=True)
        result.total.backward()
        parts.optimizer.step()
        parts.scheduler.step()

    epochs = itertools.count()

    def engine(steps: int) -> None:
        train_epoch(replace(parts, batches=FirstSteps(batches, steps)), next(epochs))

    batches.set_epoch(10_000)
    prebuilt = list(itertools.islice(iter(batches), args.steps))

    def bound(steps: int) -> None:
        net.train()
        for x, y in prebuilt[:steps]:
            step(x, y)

    pil = cifar_images(
        data.train_x[split.train_idx], data.train_y[split.train_idx], data.mean, data.std
    )

    def torchvision_pil(steps: int) -> None:
        sampler = RandomSampler(pil, num_samples=steps * cfg.train.batch_size)
        loader = DataLoader(
            pil, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=args.workers
        )
        net.train()
        for x, y in loader:
            step(x.to(device).contiguous(memory_format=torch.channels_last), y.to(device))

    variants: dict[str, Callable[[int], None]] = {
        "(a) erde engine: train_epoch over DeviceBatches": engine,
        "(b) bound: bare step on pre-built batches": bound,
        f"(c) torchvision DataLoader + PIL (num_workers={args.workers}) + bare step": (
            torchvision_pil
        ),
    }
    for run in variants.values():
        run(2)  # warm-up: first-touch memory, lazy imports, thread pools
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            sync(device)
            start = time.perf_counter()
            run(args.steps)
            sync(device)
            seconds[name].append(time.perf_counter() - start)

    images = args.steps * cfg.train.batch_size
    rates = {name: images / statistics.median(times) for name, times in seconds.items()}
    a, b, c = rates.values()
    print(
        f"ERDE step, teacher resnet20 -> student resnet8, batch {cfg.train.batch_size}, "
        f"channels_last, {args.precision}, {args.steps} steps ({images} images) per run, median of "
        f"{args.repeats}; torch {torch.__version__}, device {device}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} intra-op threads, 1-min load average {load_before:.1f} "
        f"before / {os.getloadavg()[0]:.1f} after\n"
    )
    print("| variant | images/s | runs (s) |")
    print("|---|---:|---|")
    for name, rate in rates.items():
        runs = ", ".join(f"{t:.2f}" for t in seconds[name])
        print(f"| {name} | {rate:,.0f} | {runs} |")
    print(f"\n(a)/(b) = {a / b:.2f} (goal >= 0.9); (a)/(c) = {a / c:.2f} (goal >= 1.5)")


if __name__ == "__main__":
    main()
