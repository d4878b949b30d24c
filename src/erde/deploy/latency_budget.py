"""A threshold for a latency budget, measured where the model serves, with numpy only.

MACs predict wall time badly at batch 1 (a call's fixed cost, the heads, the decisions:
docs/benchmarks.md), so a budget in milliseconds is met by timing, not by MACs: each exit's
batch-1 latency is measured on this machine through the runtime's one-call graph (every image
forced out at that exit), and a point of the export's val curve is expected to cost its exit
shares times those latencies. The choice is the highest val accuracy within the budget (ties:
the faster point), as a MACs budget's is (`erde.deploy.curve`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from erde.deploy.manifest import Manifest
from erde.errors import ErdeError

if TYPE_CHECKING:
    from erde.deploy.runtime import EarlyExitRuntime

# A threshold every finite exit score is below: the image leaves at that exit.
_ALWAYS = float(np.finfo(np.float32).max)


def exit_latencies(runtime: EarlyExitRuntime, repeats: int = 30, warmup: int = 5) -> list[float]:
    """Median seconds of one image through `single.onnx` leaving at exit 1..n, measured in
    rotating order so a busy neighbour disturbs every exit alike."""
    n = runtime.num_exits
    x = np.zeros((1, runtime.in_channels, runtime.input_size, runtime.input_size), np.float32)
    forced = []
    for e in range(n):
        cutoffs = [0.0] * (n - 1)
        if e < n - 1:
            cutoffs[e] = _ALWAYS
        forced.append(cutoffs)
    seconds: list[list[float]] = [[] for _ in range(n)]
    for j in range(warmup + repeats):
        for e in np.roll(np.arange(n), -j):
            start = time.perf_counter()
            runtime.predict(x, threshold=forced[e], form="single")
            if j >= warmup:
                seconds[e].append(time.perf_counter() - start)
    return [float(np.median(s)) for s in seconds]


def check_latency_budget(manifest: Manifest, budget_ms: float) -> None:
    """The mistakes no timing can mend, found before timing anything."""
    if not budget_ms > 0 or not np.isfinite(budget_ms):
        raise ErdeError(
            f"a latency budget must be a positive number of milliseconds; got {budget_ms}"
        )
    if manifest.val_curve is None:
        raise ErdeError(
            "this export holds no val curve (its run had no `erde evaluate`, or a format-3 "
            "export); evaluate the run and export it again"
        )


def choose_for_latency(manifest: Manifest, latencies: list[float], budget_ms: float) -> dict:
    """The val curve's point with the highest val accuracy whose expected latency (exit shares
    times `latencies`, seconds per exit) is within `budget_ms`; the point gains
    `expected_ms`."""
    check_latency_budget(manifest, budget_ms)
    ms = 1000 * np.asarray(latencies, dtype=np.float64)
    points = [
        {**p, "expected_ms": float(np.dot(p["exit_share"], ms))}
        for p in manifest.val_curve["points"]
    ]
    within = [p for p in points if p["expected_ms"] <= budget_ms]
    if not within:
        fastest = min(p["expected_ms"] for p in points)
        measured = " / ".join(f"{v:.3g}" for v in ms)
        raise ErdeError(
            f"a latency budget of {budget_ms:g} ms is below what this export can meet here: "
            f"its fastest val point is expected to take {fastest:.3g} ms per image (measured "
            f"per exit: {measured} ms); give at least that"
        )
    return max(within, key=lambda p: (p["val_accuracy"], -p["expected_ms"]))
