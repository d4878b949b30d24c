"""Images/s of erde's on-device batches against torchvision's per-image PIL pipeline.

Both produce the same training batches for CIFAR-10 (random 32x32 crop of the 4-pixel zero-padded
image, horizontal flip with probability 1/2, float32 normalised NCHW, batch 128) over the same
number of images. Run from the repository root:

    python bench/data_pipeline.py --root ../shared/data/cifar10
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from pil_baseline import cifar_images
from torch.utils.data import DataLoader, RandomSampler

from erde.data import DeviceBatches, load_source

DEFAULT_ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")


def time_device_batches(data, images: int, batch_size: int, device: str) -> float:
    batches = DeviceBatches(
        data.train_x,
        data.train_y,
        batch_size=batch_size,
        mean=data.mean,
        std=data.std,
        device=device,
        shuffle=True,
        augment=True,
        hflip=True,
        drop_last=True,
    )
    seen, epoch = 0, 0
    start = time.perf_counter()
    while seen < images:
        batches.set_epoch(epoch)
        for x, _ in batches:
            seen += len(x)
            if seen >= images:
                break
        epoch += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_torchvision(data, images: int, batch_size: int, workers: int) -> float:
    dataset = cifar_images(data.train_x, data.train_y, data.mean, data.std)
    sampler = RandomSampler(dataset, num_samples=images)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
    start = time.perf_counter()  # worker start-up included: it is paid every epoch by default
    for _ in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder with train.npz/test.npz")
    parser.add_argument("--images", type=int, default=25600, help="images per timed run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3, help="runs per pipeline (median kept)")
    parser.add_argument("--device", default="cpu", help="device for DeviceBatches")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    data = load_source("npz", args.root)
    runs = {
        "erde DeviceBatches (" + args.device + ")": lambda: time_device_batches(
            data, args.images, args.batch_size, args.device
        )
    }
    for w in args.workers:
        runs[f"torchvision PIL + DataLoader, num_workers={w}"] = lambda w=w: time_torchvision(
            data, args.images, args.batch_size, w
        )
    for run in runs.values():
        run()  # warm-up: first-touch memory, lazy imports, thread pools
    # Round-robin repeats: on a shared machine every pipeline meets the same background load.
    seconds = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            seconds[name].append(run())
    rates = {name: args.images / statistics.median(times) for name, times in seconds.items()}

    ours = next(iter(rates.values()))
    print(
        f"{args.images} CIFAR-10 train images per run, batch {args.batch_size}, "
        f"median of {args.repeats} runs, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} intra-op threads, "
        f"1-min load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after\n"
    )
    print("| pipeline | images/s | erde speed-up |")
    print("|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {ours / rate:.1f}x |")


if __name__ == "__main__":
    main()
