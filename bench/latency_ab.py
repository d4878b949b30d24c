"""Side by side: several `erde export` folders of one run timed in one rotation (before/after).

    python bench/latency_ab.py before=EXPORT_A after=EXPORT_B [more LABEL=EXPORT ...]
        [--batch 1] [--repeats 3000] [--warmup 200] [--threads 1]

`erde bench` times one export; comparing two versions of erde (or two export settings) in two runs
compares two states of a loaded machine as well. Here every batch goes through every
configuration of every export in turn (static, early exit at 0, at the val-calibrated budget
points and at the export's own threshold), in rotating order, through the same runtime
(`EarlyExitRuntime.predict`, as `erde bench` calls it). Besides wall time it records the thread's
CPU time per call (`time.thread_time`): ONNX Runtime runs on the calling thread with one intra-op
thread, so CPU time is the call's work without the time other processes held the core, the
steadier estimator on a shared machine (it still includes their effect on the caches). The
realised speed-up is the first export's static time over the configuration's, summed over the same
images, as in `erde bench` (`erde.deploy.latency`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from erde.deploy.latency import early_exit_runner, held_out_images, static_runner
from erde.deploy.manifest import read_manifest
from erde.deploy.runtime import EarlyExitRuntime, export_session
from erde.run.report import markdown_table


def _configs(label: str, export_dir: Path, threads: int) -> list[tuple]:
    """(label, name, threshold or None, run) of one export; `run(batch) -> (classes, exits or
    None)` is `erde bench`'s own runner."""
    m = read_manifest(export_dir)
    static = static_runner(export_session(export_dir, m.static, threads))
    runtime = EarlyExitRuntime.from_export(export_dir, threads=threads)
    thresholds = sorted({0.0, m.deployment.threshold, *m.budget_thresholds.values()})
    return [(label, f"{m.precision} static", None, static)] + [
        (label, f"{m.precision} early exit", t, early_exit_runner(runtime, t, "auto"))
        for t in thresholds
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", metavar="LABEL=EXPORT_DIR")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not all("=" in s for s in args.exports):
        parser.error("give every export as LABEL=EXPORT_DIR, e.g. before=/tmp/old")
    exports = [(s.split("=", 1)[0], Path(s.split("=", 1)[1])) for s in args.exports]
    first = read_manifest(exports[0][1])
    x, _ = held_out_images(Path(first.source_run), first)
    configs = [c for label, d in exports for c in _configs(label, d, args.threads)]
    wall = np.zeros((len(configs), args.repeats))
    cpu = np.zeros_like(wall)
    exits = [np.zeros(len(first.info.exit_macs)) for _ in configs]
    b = args.batch
    for j in range(args.warmup + args.repeats):
        xb = x[torch.arange(j * b, (j + 1) * b) % len(x)]
        for k in np.roll(np.arange(len(configs)), -j):
            c0, w0 = time.thread_time(), time.perf_counter()
            _, taken = configs[k][3](xb)
            w1, c1 = time.perf_counter(), time.thread_time()
            if j >= args.warmup:
                wall[k, j - args.warmup], cpu[k, j - args.warmup] = w1 - w0, c1 - c0
                if taken is not None:
                    exits[k] += np.bincount(taken - 1, minlength=len(exits[k]))
    cost = np.asarray(first.info.exit_macs, np.float64)
    rows = []
    for k, (label, name, threshold, _) in enumerate(configs):
        share = exits[k] / exits[k].sum() if exits[k].sum() else None
        predicted = 1.0 if share is None else first.info.static_macs / float(cost @ share)
        realised = wall[0].sum() / wall[k].sum(), cpu[0].sum() / cpu[k].sum()
        rows.append(
            [
                label,
                name,
                "-" if threshold is None else f"{threshold:.4g}",
                f"{1e6 * np.median(wall[k]) / b:.1f}",
                f"{1e6 * wall[k].mean() / b:.1f}",
                f"{1e6 * cpu[k].mean() / b:.1f}",
                "-" if share is None else " / ".join(f"{s:.2f}" for s in share),
                f"{predicted:.2f}x",
                f"{realised[0]:.2f}x / {realised[1]:.2f}x",
                f"{100 * realised[0] / predicted:.0f} / {100 * realised[1] / predicted:.0f}",
            ]
        )
    print(
        f"batch {b}, {args.repeats} timed batches after {args.warmup}, {args.threads} intra-op "
        f"thread(s), in order from the {len(x):,} test images of {first.source_run}\n"
    )
    print(
        markdown_table(
            [
                "export",
                "model",
                "threshold",
                "median µs/image (wall)",
                "mean µs/image (wall)",
                "mean µs/image (CPU)",
                "exit shares",
                "speed-up, MACs-predicted",
                "speed-up, realised (wall / CPU)",
                "realised / predicted (%, wall / CPU)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
