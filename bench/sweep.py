"""Time the threshold sweep: scores, the vectorised sweep, and both together.

Usage: python bench/sweep.py [--samples 10000] [--exits 4] [--classes 100] [--thresholds 1000]
Prints a markdown table of median wall times over --repeats runs on --threads CPU threads.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from erde.evaluation.policy import confidence_scores
from erde.evaluation.sweep import sweep, sweep_from_scores
from erde.run.report import markdown_table


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations are not what a user waits for repeatedly
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--exits", type=int, default=4)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--thresholds", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    n, e, k = args.samples, args.exits, args.classes
    logits = torch.randn(n, e, k, generator=g) * torch.rand(n, e, 1, generator=g) * 8
    labels = torch.randint(0, k, (n,), generator=g)
    cum_macs = np.arange(1, e + 1) * 1e7
    thresholds = np.linspace(0.0, np.log(k), args.thresholds)
    scores = confidence_scores(logits).numpy()
    correct = (logits.argmax(dim=-1) == labels[:, None]).numpy()

    rows = []
    for name, fn in [
        ("entropy scores (N x E)", lambda: confidence_scores(logits)),
        ("maxprob scores (N x E)", lambda: confidence_scores(logits, "maxprob")),
        ("sweep from scores", lambda: sweep_from_scores(scores, correct, cum_macs, thresholds)),
        ("sweep() end to end (entropy)", lambda: sweep(logits, labels, cum_macs, thresholds)),
        ("sweep() end to end, default grid", lambda: sweep(logits, labels, cum_macs)),
    ]:
        rows.append([name, f"{median_seconds(fn, args.repeats) * 1e3:.1f}"])
    print(
        f"{n} samples x {e} exits x {k} classes, {args.thresholds} thresholds, "
        f"{args.threads} threads, median of {args.repeats}\n"
    )
    print(markdown_table(["step", "median time (ms)"], rows))


if __name__ == "__main__":
    main()
