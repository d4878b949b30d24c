"""Does `train.compile=true` (torch.compile, inductor) pay for itself on the CPU within one run?

For the `cifar10-cpu` student step (CIFAR ResNet-8, erde loss, teacher outputs from the cache,
batch 128, channels_last) and the teacher run's step (CIFAR ResNet-20, teacher loss), in fp32
and bf16: the engine's own epoch loop (`erde.train.engine.train_epoch`) eager and compiled. Compile
cost = the compiled model's first 2 steps minus 2 eager steps; steady cost = median of
`--repeats` runs of K steps. Break-even = compile cost / saving per step, against the steps of
one `cifar10-cpu` run (351 a epoch; 10 student / 12 teacher epochs). Run from the repository root:

    python bench/compile_cpu.py --root ../shared/data/cifar10 --threads 2
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

RUN_EPOCHS = {"student": 10, "teacher": 12}


def timed(parts, steps: int) -> float:
    start = time.perf_counter()
    train_epoch(replace(parts, batches=FirstSteps(parts.batches, steps)), 0)
    return time.perf_counter() - start


def measure(base: list[str], steps: int, repeats: int) -> tuple[float, float, float]:
    """(eager s/step, compiled s/step, compile seconds)."""
    eager = setup(load_config(None, base), torch.device("cpu"), progress=False).parts
    compiled = setup(
        load_config(None, [*base, "train.compile=true"]), torch.device("cpu"), progress=False
    ).parts
    timed(eager, 2)  # warm-up
    first = timed(compiled, 2)
    eager_two = timed(eager, 2)
    runs: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):
        runs["eager"].append(timed(eager, steps))
        runs["compiled"].append(timed(compiled, steps))
    e, c = (statistics.median(runs[k]) / steps for k in ("eager", "compiled"))
    return e, c, first - eager_two


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="CIFAR-10 folder (npz or official)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = tempfile.mkdtemp(prefix="erde-bench-teacher-")
    data = [
        "data.source=cifar10",
        f"data.root={args.root}",
        "train.batch_size=128",
        "train.epochs=1",
        "train.channels_last=true",
        "train.device=cpu",
    ]
    random_teacher(prepare_data(load_config(None, data)).data, teacher)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
        f"{args.steps} steps per run, median of {args.repeats}\n"
    )
    print(
        "| network | precision | eager ms/step | compiled ms/step | compile s | "
        "break-even steps | steps in one run |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for precision in ("fp32", "bf16"):
        student = [
            *data,
            "model.name=resnet8",
            f"train.precision={precision}",
            "distill.method=erde",
            f"distill.teacher={teacher}",
            f"distill.teacher_cache_dir={Path(teacher) / 'cache'}",
        ]
        fill_teacher_cache(load_config(None, student))
        rows = {
            "student resnet8 (cache)": student,
            "teacher resnet20": [*data, "model.name=resnet20", f"train.precision={precision}"],
        }
        for name, base in rows.items():
            e, c, compile_s = measure(base, args.steps, args.repeats)
            saving = e - c
            even = f"{compile_s / saving:,.0f}" if saving > 0 else "never"
            run_steps = 351 * RUN_EPOCHS[name.split()[0]]
            print(
                f"| {name} | {precision} | {1000 * e:.0f} | {1000 * c:.0f} | {compile_s:.0f} | "
                f"{even} | {run_steps:,} |"
            )


if __name__ == "__main__":
    main()
