"""The static frontier: what a plain network of the ladder gives at each MACs budget, and where an
early-exit curve lies above it by more than the seeds' spread.

A static run (a method registered with `early_exits=False`, erde's `static`) is one point: its
MACs and test accuracy, mean ± std over its seeds. The frontier at a budget of m MACs is the
point with the best mean accuracy among those costing at most m: a step function, the honest
"what could I deploy for this budget" (no straight line between two sizes, since no network lies
there). Below the smallest static network it is undefined: no plain network of the ladder fits.
An early-exit group is compared with it as `erde.evaluation.versus` compares two groups, over the
MACs its curves cover from the smallest static network's MACs on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from erde.config.methods import static_methods
from erde.evaluation.compare import Comparison, common_grid
from erde.evaluation.sweep import Curve
from erde.evaluation.versus import Versus, bands_versus, describe


@dataclass(frozen=True)
class StaticPoint:
    """One static group: its MACs, mean and std (ddof=1; 0 for one seed) test accuracy."""

    label: str
    macs: float
    mean: float
    std: float
    seeds: int


def static_points(comparison: Comparison) -> list[StaticPoint]:
    """The comparison's static groups as points, cheapest first."""
    plain = set(static_methods())
    points = []
    for label, runs in comparison.groups.items():
        if runs[0].report.method not in plain:
            continue
        acc = np.array([s.report.per_exit_accuracy["test"][-1] for s in runs])
        std = float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
        macs = float(runs[0].report.exit_macs[-1])
        points.append(StaticPoint(label, macs, float(acc.mean()), std, len(acc)))
    return sorted(points, key=lambda p: p.macs)


def frontier(points: Sequence[StaticPoint], macs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the frontier at each of `macs`: those of the point with the best mean
    among the points costing at most that; NaN below the cheapest point."""
    order = sorted(points, key=lambda p: p.macs)
    best: list[StaticPoint] = []
    for p in order:  # the best point at or below each point's MACs
        best.append(p if not best or p.mean > best[-1].mean else best[-1])
    at = np.searchsorted([p.macs for p in order], np.asarray(macs, dtype=float), side="right") - 1
    mean = np.array([best[j].mean if j >= 0 else np.nan for j in at])
    std = np.array([best[j].std if j >= 0 else np.nan for j in at])
    return mean, std


def versus_frontier(
    curves: Sequence[Curve], points: Sequence[StaticPoint], n_points: int = 400
) -> Versus | None:
    """An early-exit group's seeds against the frontier, over the MACs every curve covers from the
    cheapest static point on; None when the curves end below it (no static network fits)."""
    grid, functions = common_grid(curves, n_points)
    lo, hi = max(float(grid[0]), min(p.macs for p in points)), float(grid[-1])
    if lo > hi:
        return None
    grid = np.linspace(lo, hi, n_points)
    acc = np.stack([np.interp(grid, m, y) for m, y in functions])
    std = acc.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(n_points)
    f_mean, f_std = frontier(points, grid)
    seeds = min(p.seeds for p in points)
    return bands_versus(grid, (acc.mean(axis=0), std, len(curves)), (f_mean, f_std, seeds))


def against_frontier(comparison: Comparison) -> dict[str, Versus | None]:
    """Every early-exit group of a comparison (the teacher too) against its static frontier;
    empty when it holds no static run."""
    points = static_points(comparison)
    if not points:
        return {}
    plain = {p.label for p in points}
    return {
        label: versus_frontier([s.test_curve for s in runs], points)
        for label, runs in comparison.groups.items()
        if label not in plain
    }


def render_frontier(comparison: Comparison) -> list[str]:
    """The `comparison.md` section: the static points, then one sentence per early-exit group."""
    points = static_points(comparison)
    if not points:
        return []
    cheapest = points[0].macs / 1e6
    lines = [
        "## Against the static frontier",
        "",
        "Plain networks without early exits, trained with KD from the teacher's last exit "
        "(`static`), test accuracy mean ± std over their seeds:",
        "",
        *(
            f"- {p.label}: {p.macs / 1e6:.2f} M MACs, {100 * p.mean:.2f} ± {100 * p.std:.2f} % "
            f"({p.seeds} seed{'s' if p.seeds > 1 else ''})"
            for p in points
        ),
        "",
        "The frontier at a budget is the best static accuracy at or below it (a step: only the "
        "listed sizes exist). Each early-exit group's mean curve is *above* it where the lower "
        "edge of its ± std band lies above the frontier's upper edge (`erde.evaluation.versus`), "
        f"over the MACs its curves cover from {cheapest:.2f} M on; below that no static network "
        "of the ladder fits.",
        "",
    ]
    for label, v in against_frontier(comparison).items():
        if v is None:
            lines.append(
                f"- {label}: its curve ends below {cheapest:.2f} M MACs, the cheapest static "
                "network: none fits its budgets."
            )
        else:
            lines.append(f"- {describe(v, label, 'the static frontier')}")
    return [*lines, ""]
