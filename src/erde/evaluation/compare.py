"""Several runs side by side: grouped by method, model and the config keys that differ (the rule
is in `groups`), seeds together (no files, no plots).

`aggregate` is pure: summaries in, a `Comparison` out. `render.render_comparison` turns it into
markdown and `plots.plot_comparison` into a PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from erde.config.methods import methods_table
from erde.errors import ErdeError
from erde.evaluation.groups import check_seeds, differing_keys, experiment_keys, group_label
from erde.evaluation.summary import RunSummary
from erde.evaluation.sweep import Curve
from erde.run.report import Reference


@dataclass(frozen=True)
class Comparison:
    """Runs grouped as "method (model), key=value, ...", one summary per seed, against one
    reference (that of the first run: every run gets the same one when a reference run is
    given)."""

    reference: Reference
    policy: str
    max_drop_points: float
    groups: dict[str, list[RunSummary]]

    def to_json(self) -> dict[str, Any]:
        """What `comparison.json` holds: the reference and every run's report, by group."""
        return {
            "reference": self.reference,
            "policy": self.policy,
            "max_drop_points": self.max_drop_points,
            "groups": {
                label: {
                    "runs": [s.report.run for s in runs],
                    "seeds": [s.report.seed for s in runs],
                    "summaries": [s.report for s in runs],
                }
                for label, runs in self.groups.items()
            },
        }


def aggregate(summaries: Sequence[RunSummary], max_drop: float) -> Comparison:
    """Group the runs' summaries (at least one) by method, model and every experiment key that
    differs among them, in the order given; two runs of one seed in a group are an error.

    Teachers and students are compared among their own kind: a teacher's longer schedule is not
    a difference between students, and does not name every row.
    """
    keys = [experiment_keys(s.config, s.report.method) for s in summaries]
    role = [_is_student(s.report.method) for s in summaries]
    differing = {
        r: differing_keys([k for k, kr in zip(keys, role, strict=True) if kr == r])
        for r in set(role)
    }
    groups: dict[str, list[RunSummary]] = {}
    for s, k, r in zip(summaries, keys, role, strict=True):
        label = group_label(s.report.method, s.report.model, k, differing[r])
        groups.setdefault(label, []).append(s)
    for label, runs in groups.items():
        check_seeds(label, [(s.report.run, s.report.seed, s.config) for s in runs])
    first = summaries[0].report
    return Comparison(first.reference, first.policy, max_drop, groups)


def _is_student(method: str) -> bool:
    table = methods_table()
    return table[method].student if method in table else True


def accuracy_of_macs(curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    """The curve as a function of MACs: thresholds with equal MACs are averaged."""
    macs, inverse = np.unique(curve.expected_macs, return_inverse=True)
    acc = np.bincount(inverse, weights=curve.accuracy) / np.bincount(inverse)
    return macs, acc


def common_grid(
    curves: Sequence[Curve], n_points: int
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Each curve as accuracy of MACs, and an even grid over the range every one covers (nothing
    extrapolated)."""
    functions = [accuracy_of_macs(c) for c in curves]
    lo = max(m[0] for m, _ in functions)
    hi = min(m[-1] for m, _ in functions)
    if lo > hi:
        raise ErdeError(
            f"these curves share no MACs range ([{lo:.6g}, {hi:.6g}] is empty); average or "
            "compare only models whose exits cover a common compute range."
        )
    return np.linspace(lo, hi, n_points), functions


def mean_std_curves(
    curves: Sequence[Curve], n_points: int = 200, max_gap: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std accuracy of several seeds' curves on one MACs grid.

    Each curve is read as accuracy as a function of expected MACs (points with equal MACs
    averaged, straight lines between points) and sampled on ``n_points`` evenly spaced MACs over
    the range every curve covers, so nothing is extrapolated. The std is the sample standard
    deviation across curves (ddof=1; zero for a single curve). With ``max_gap`` (a share of a
    curve's first-to-last-exit MACs range), a grid point inside a wider step between two of a
    curve's points is NaN: no threshold gives a point there, and a straight line would invent one.
    """
    if not curves:
        raise ValueError("mean_std_curves needs at least one curve")
    grid, functions = common_grid(curves, n_points)
    acc = np.stack([np.interp(grid, m, a) for m, a in functions])
    if max_gap is not None:
        for row, (m, _), c in zip(acc, functions, curves, strict=True):
            row[in_gaps(grid, m, max_gap * float(c.exit_macs[-1] - c.exit_macs[0]))] = np.nan
    std = acc.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(n_points)
    return grid, acc.mean(axis=0), std


def in_gaps(x: np.ndarray, points: np.ndarray, width: float) -> np.ndarray:
    """Which of `x` lie strictly between two neighbours of the sorted `points` more than `width`
    apart."""
    if len(points) < 2:
        return np.zeros(len(x), dtype=bool)
    j = np.clip(np.searchsorted(points, x, side="right") - 1, 0, len(points) - 2)
    left, right = points[j], points[j + 1]
    return (x > left) & (x < right) & (right - left > width)
