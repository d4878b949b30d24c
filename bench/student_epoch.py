"""How much cheaper is a student epoch with the teacher-output cache and bf16? Side by side.

The `cifar10-cpu` pair (teacher CIFAR ResNet-20 with random weights: the cost is the same whatever
it learnt; student CIFAR ResNet-8), real CIFAR-10, batch 128, channels_last, the `erde` loss. Each
variant is the real engine (`erde.train.engine.train_epoch`) over the first K steps of an epoch:

  today       fp32, the teacher's forward pass on every step (`distill.teacher_cache=false`)
  bf16        bf16 autocast, teacher forward on every step
  cache       fp32, teacher outputs read from the cache
  cache+bf16  both

The cache of the timed epoch is filled before the clock starts (its one-off cost, the teacher's
forward pass over one epoch, is reported on its own line: `erde reproduce` pays it once per seed
for every student). Variants run round-robin, `--repeats` times, after one warm-up each; the
median is kept. The ratio that matters is today / cache+bf16 in seconds per step. Run from the
repository root:

    python bench/student_epoch.py --root ../shared/data/cifar10 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from train_throughput import DEFAULT_ROOT, FirstSteps, random_teacher

from erde.config.schema import load_config
from erde.data.prepare import prepare_data
from erde.train.engine import fill_teacher_cache, setup, train_epoch

VARIANTS = {
    "today (fp32, teacher every step)": ["train.precision=fp32", "distill.teacher_cache=false"],
    "bf16, teacher every step": ["train.precision=bf16", "distill.teacher_cache=false"],
    "cache, fp32": ["train.precision=fp32"],
    "cache + bf16": ["train.precision=bf16"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="CIFAR-10 folder (npz or official)")
    parser.add_argument("--steps", type=int, default=30, help="K: steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    teacher = tempfile.mkdtemp(prefix="erde-bench-teacher-")
    base = [
        "data.source=cifar10",
        f"data.root={args.root}",
        "model.name=resnet8",
        "train.batch_size=128",
        "train.epochs=1",
        "train.channels_last=true",
        "train.device=cpu",
        "distill.method=erde",
        f"distill.teacher={teacher}",
        f"distill.teacher_cache_dir={Path(teacher) / 'cache'}",
    ]
    random_teacher(prepare_data(load_config(None, base)).data, teacher)
    configs = {name: load_config(None, [*base, *extra]) for name, extra in VARIANTS.items()}
    fills = {}
    for cfg in configs.values():
        if cfg.distill.teacher_cache:
            start = time.perf_counter()
            fill_teacher_cache(cfg)
            fills[cfg.train.precision] = time.perf_counter() - start
    parts = {
        name: setup(cfg, torch.device("cpu"), progress=False).parts for name, cfg in configs.items()
    }

    def run(name: str) -> float:
        p = parts[name]
        start = time.perf_counter()
        # Epoch 0 always: the one whose cache was filled (each call re-reads it from disk).
        train_epoch(replace(p, batches=FirstSteps(p.batches, args.steps)), 0)
        return time.perf_counter() - start

    for name in parts:
        run(name)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name in parts:
            seconds[name].append(run(name))
    per_step = {name: statistics.median(t) / args.steps for name, t in seconds.items()}
    today = per_step[next(iter(per_step))]
    n = len(parts[next(iter(parts))].batches)
    print(
        f"student resnet8 <- teacher resnet20, erde loss, batch 128, channels_last, {args.steps} "
        f"steps per run, median of {args.repeats}; torch {torch.__version__}, {os.cpu_count()} "
        f"CPUs, {torch.get_num_threads()} threads, 1-min load {load_before:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after\n"
    )
    print("| variant | ms per step | student epoch (s, extrapolated) | speed-up vs today |")
    print("|---|---:|---:|---:|")
    for name, s in per_step.items():
        print(f"| {name} | {1000 * s:.0f} | {s * n:.0f} | {today / s:.2f}x |")
    for precision, t in fills.items():
        print(f"\none-off cache fill, one epoch ({n} steps), {precision}: {t:.1f} s")


if __name__ == "__main__":
    main()
