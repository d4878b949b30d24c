"""Is one method better than another "at every threshold"? Compared over the MACs range both cover.

The paper's claim is about whole curves, and a difference smaller than the seeds' spread is not
evidence. So two groups of seeds are compared on one MACs grid over the range every curve of both
covers: where the lower edge of A's mean ± std band lies above the upper edge of B's, A is *above*;
the mirror case is *below*; elsewhere the bands overlap and the difference is *within spread*.
With one seed per group the std is zero and any difference counts: say how many seeds there were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from erde.errors import ErdeError
from erde.evaluation.compare import Comparison, common_grid
from erde.evaluation.sweep import Curve

ABOVE, BELOW, WITHIN = "above", "below", "within spread"


@dataclass(frozen=True)
class Stretch:
    """A maximal MACs interval with one verdict; `mean_gap` is mean(A - B) over it (fraction)."""

    lo_macs: float
    hi_macs: float
    verdict: str
    mean_gap: float


@dataclass(frozen=True)
class Versus:
    """A against B: the shared MACs range cut into stretches of one verdict each."""

    seeds_a: int
    seeds_b: int
    stretches: tuple[Stretch, ...]

    @property
    def lo_macs(self) -> float:
        return self.stretches[0].lo_macs

    @property
    def hi_macs(self) -> float:
        return self.stretches[-1].hi_macs

    def share(self, verdict: str) -> float:
        """Fraction of the shared MACs range with this verdict."""
        width = self.hi_macs - self.lo_macs
        if width <= 0:
            return float(all(s.verdict == verdict for s in self.stretches))
        inside = sum(s.hi_macs - s.lo_macs for s in self.stretches if s.verdict == verdict)
        return inside / width


def versus(a: Sequence[Curve], b: Sequence[Curve], n_points: int = 400) -> Versus:
    """The MACs range every curve of `a` and `b` covers, cut into stretches of one verdict."""
    if not a or not b:
        raise ValueError("versus needs at least one curve on each side")
    grid, functions = common_grid([*a, *b], n_points)
    acc = np.stack([np.interp(grid, m, y) for m, y in functions])
    acc_a, acc_b = acc[: len(a)], acc[len(a) :]
    mean_a, mean_b = acc_a.mean(axis=0), acc_b.mean(axis=0)
    std_a = acc_a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros(n_points)
    std_b = acc_b.std(axis=0, ddof=1) if len(b) > 1 else np.zeros(n_points)
    return bands_versus(grid, (mean_a, std_a, len(a)), (mean_b, std_b, len(b)))


Band = tuple[np.ndarray, np.ndarray, int]  # mean, std on a MACs grid, and the seeds behind them


def bands_versus(grid: np.ndarray, a: Band, b: Band) -> Versus:
    """Two mean ± std bands on one MACs grid cut into stretches of one verdict (what `versus`
    does with curves, and `erde.evaluation.frontier` with the static frontier)."""
    (mean_a, std_a, seeds_a), (mean_b, std_b, seeds_b) = a, b
    n_points = len(grid)
    verdicts = np.where(
        mean_a - std_a > mean_b + std_b,
        ABOVE,
        np.where(mean_a + std_a < mean_b - std_b, BELOW, WITHIN),
    )
    gap = mean_a - mean_b
    stretches = []
    start = 0
    for i in range(1, n_points + 1):
        if i == n_points or verdicts[i] != verdicts[start]:
            end = min(i, n_points - 1)  # a stretch ends where the next one starts
            stretches.append(
                Stretch(
                    float(grid[start]), float(grid[end]), str(verdicts[start]),
                    float(gap[start:i].mean()),
                )
            )  # fmt: skip
            start = i
    return Versus(seeds_a, seeds_b, tuple(stretches))


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def describe(v: Versus, name_a: str, name_b: str) -> str:
    """One sentence per verdict, MACs in M and shares of the shared range, for reports."""
    parts = []
    for verdict in (ABOVE, WITHIN, BELOW):
        spans = [s for s in v.stretches if s.verdict == verdict]
        if not spans:
            continue
        where = ", ".join(f"{s.lo_macs / 1e6:.2f}-{s.hi_macs / 1e6:.2f} M" for s in spans)
        gap = np.mean([s.mean_gap for s in spans]) * 100
        parts.append(f"{verdict} ({100 * v.share(verdict):.0f} % of the range: {where}; "
                     f"mean gap {gap:+.2f} pt)")  # fmt: skip
    return (
        f"{name_a} ({_seeds(v.seeds_a)}) against {name_b} ({_seeds(v.seeds_b)}) over "
        f"{v.lo_macs / 1e6:.2f}-{v.hi_macs / 1e6:.2f} M MACs: " + "; ".join(parts) + "."
    )


def against(comparison: Comparison, method: str) -> dict[str, Versus]:
    """Every other student group of a comparison against the one group of `method` (the
    `--versus` of `erde compare`), on the test curves."""
    groups = comparison.groups
    base = [label for label, runs in groups.items() if runs[0].report.method == method]
    if len(base) != 1:
        found = "no group" if not base else f"{len(base)} groups ({'; '.join(base)})"
        raise ErdeError(
            f"--versus {method}: the compared runs hold {found} of method {method}; give runs "
            "of one setting of it (a grid makes one group per setting: compare one at a time)"
        )
    curves = [s.test_curve for s in groups[base[0]]]
    return {
        label: versus([s.test_curve for s in runs], curves)
        for label, runs in groups.items()
        if label != base[0] and runs[0].report.method != "teacher"
    }


def render_versus(results: dict[str, Versus], method: str) -> str:
    """`versus.md`: one `describe` sentence per group against `method`'s group."""
    return "\n".join(
        [
            f"# Against {method}",
            "",
            "Test accuracy over the MACs range every curve of both sides covers: *above* where a "
            "group's mean ± std band lies above the other's, *below* in the mirror case, *within "
            "spread* where they overlap (`erde.evaluation.versus`). With one seed a side any "
            "difference counts.",
            "",
            *(f"- {describe(v, label, method)}" for label, v in results.items()),
            "",
        ]
    )
