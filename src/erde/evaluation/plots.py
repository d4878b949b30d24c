"""PNG plots of evaluations and comparisons.

Units in, units out: accuracy comes as a fraction and MACs per image; the plots show accuracy in %
and MACs in millions (M). They render on matplotlib's Agg canvas without pyplot, so no display is
needed and no global state changes, and every file goes through the one atomic writer. Each
function returns its `Figure`, so a test can read what was drawn without looking at pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from erde.evaluation.compare import Comparison, mean_std_curves
from erde.evaluation.frontier import StaticPoint, frontier, static_points
from erde.evaluation.summary import RunSummary
from erde.evaluation.sweep import Curve
from erde.files import write_bytes
from erde.run.layout import ReportDir
from erde.run.report import OWN_REFERENCE, Reference, Report

DPI = 150
# A log MACs axis when the largest MACs drawn exceed the smallest this many times: on a linear
# axis a teacher several times the students' cost squeezes their curves into a sliver.
LOG_X_RATIO = 5.0
# A step between two sweep points wider than this share of the model's first-to-last-exit MACs is
# a gap: no threshold gives a point inside it, so no line is drawn across it.
GAP = 0.05
# The markers of each exit on its own (hollow circles) and of the chosen point (diamonds).
EXITS_LABEL = "each exit on its own"
_EXIT_MARKER = {"linestyle": "none", "marker": "o", "markersize": 5, "markerfacecolor": "white"}
EXIT_SHAPES = ("o", "s", "^", "v", "P", "X", "<", ">")  # one per series, in turn
_CHOSEN_MARKER = {"linestyle": "none", "marker": "D", "markersize": 7, "markeredgecolor": "black"}


@dataclass(frozen=True)
class Series:
    """One curve of `plot_tradeoff`, in MACs order (MACs per image, accuracy as a fraction); a
    NaN breaks the line. `std`: a band of ±std, the spread over `seeds` seeds. `exits`: each
    exit on its own, (MACs, accuracy) per exit; `chosen`: the chosen operating point."""

    label: str
    macs: np.ndarray
    accuracy: np.ndarray
    std: np.ndarray | None = None
    seeds: int = 1
    exits: tuple[Sequence[float], Sequence[float]] | None = None
    chosen: tuple[float, float] | None = None


def _figure(size: tuple[float, float], ncols: int = 1) -> tuple[Figure, Any]:
    """A pyplot-free figure on the Agg canvas: no display, no global backend switch."""
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _save(fig: Figure, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    write_bytes(Path(path), buf.getvalue())


def break_gaps(curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    """A sweep's (MACs, accuracy) in MACs order, with a NaN in every gap (wider than `GAP`)."""
    order = np.argsort(curve.expected_macs, kind="stable")
    macs, accuracy = curve.expected_macs[order], curve.accuracy[order]
    width = GAP * float(curve.exit_macs[-1] - curve.exit_macs[0])
    cut = np.flatnonzero(np.diff(macs) > width) + 1
    return np.insert(macs, cut, np.nan), np.insert(accuracy, cut, np.nan)


def _log_axis(ax: Any) -> None:
    """Log MACs axis with plain numbers at 1, 2, 3 and 5 of every decade."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_tradeoff(
    path: str | Path,
    series: Sequence[Series],
    reference: dict | None = None,
    *,
    title: str,
    chosen_label: str = "chosen operating point",
    static: Sequence[StaticPoint] = (),
) -> Figure:
    """Accuracy (%) versus expected MACs per image (M), one line per series, with the markers
    and bands the series carry, each kind once in the legend.

    ``reference``: {label, macs, accuracy} drawn as a star (e.g. the teacher's full model). The
    MACs axis is logarithmic when the MACs drawn span more than `LOG_X_RATIO`. Name the split
    (val/test) in ``title`` or the labels. ``static``: plain networks, drawn as points (± std)
    joined by the static frontier's steps (`erde.evaluation.frontier`).
    """
    fig, ax = _figure((6.4, 4.4))
    xs: list[np.ndarray] = []  # every x drawn, which decides the axis scale
    shapes = [EXIT_SHAPES[i % len(EXIT_SHAPES)] for i in range(len(series))]
    handles = [_draw_series(ax, s, xs, shape) for s, shape in zip(series, shapes, strict=True)]
    handles += _marker_handles(series, chosen_label)
    if reference is not None:
        handles.append(_draw_reference(ax, reference, xs))
    if static:
        handles.append(_draw_frontier(ax, static, xs))
    _macs_axis(ax, xs)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    # Beside the axes, not on them: no curve is ever hidden under the legend.
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    _save(fig, path)
    return fig


def _draw_series(ax: Any, s: Series, xs: list[np.ndarray], shape: str) -> Any:
    """One series' line, std band, exit and chosen markers in one colour; adds its x to `xs`.
    Its exit markers take `shape`, which its legend entry shows: students of one architecture
    share their exits' MACs, and markers of one shape would hide each other."""
    macs = np.asarray(s.macs, dtype=float) / 1e6
    acc = np.asarray(s.accuracy, dtype=float) * 100
    (line,) = ax.plot(macs, acc, label=s.label, linewidth=1.5)
    xs.append(macs)
    color = line.get_color()
    if s.std is not None:
        std = np.asarray(s.std, dtype=float) * 100
        ax.fill_between(macs, acc - std, acc + std, color=color, alpha=0.2, linewidth=0)
    if s.exits is not None:
        exit_macs = np.asarray(s.exits[0], dtype=float) / 1e6
        xs.append(exit_macs)
        marker = {**_EXIT_MARKER, "marker": shape}
        ax.plot(exit_macs, np.asarray(s.exits[1]) * 100, **marker, color=color)
    if s.chosen is not None:
        xs.append(np.array([s.chosen[0] / 1e6]))
        ax.plot([s.chosen[0] / 1e6], [s.chosen[1] * 100], **_CHOSEN_MARKER, color=color)
    if s.exits is None:
        return Line2D([], [], color=color, linewidth=1.5, label=s.label)
    return Line2D(
        [], [], color=color, linewidth=1.5, label=s.label, marker=shape, markerfacecolor="white"
    )


def _marker_handles(series: Sequence[Series], chosen_label: str) -> list[Any]:
    """One gray legend entry per kind of marker or band the series carry."""
    handles: list[Any] = []
    if any(s.exits is not None for s in series):
        handles.append(Line2D([], [], **_EXIT_MARKER, color="gray", label=EXITS_LABEL))
    if any(s.chosen is not None for s in series):
        handles.append(Line2D([], [], **_CHOSEN_MARKER, color="gray", label=chosen_label))
    bands = sorted({s.seeds for s in series if s.std is not None})
    return handles + [
        Patch(color="gray", alpha=0.2, label=f"mean ± std over {n} seeds") for n in bands
    ]


def _draw_reference(ax: Any, reference: dict, xs: list[np.ndarray]) -> Any:
    """The reference as a black star; adds its x to `xs`."""
    xs.append(np.array([reference["macs"] / 1e6]))
    (star,) = ax.plot(
        [reference["macs"] / 1e6],
        [reference["accuracy"] * 100],
        marker="*",
        markersize=12,
        linestyle="none",
        color="black",
        label=reference["label"],
    )
    return star


FRONTIER_LABEL = "static frontier (best plain network at or below the MACs)"


def _draw_frontier(ax: Any, static: Sequence[StaticPoint], xs: list[np.ndarray]) -> Any:
    """The static points with ± std bars, and the frontier as steps from the cheapest point to the
    largest MACs drawn (a budget beyond the largest network still buys it); adds to `xs`."""
    macs = np.array([p.macs for p in static]) / 1e6
    finite = [x[np.isfinite(x)] for x in xs]
    right = max([macs.max(), *(float(x.max()) for x in finite if len(x))])
    steps = np.append(macs, right)
    mean, _ = frontier(static, steps * 1e6)
    ax.step(steps, mean * 100, where="post", color="black", linestyle="--", linewidth=1.2)
    ax.errorbar(
        macs,
        [100 * p.mean for p in static],
        yerr=[100 * p.std for p in static],
        fmt="s",
        color="black",
        markersize=5,
        capsize=3,
    )
    xs.append(macs)
    return Line2D([], [], color="black", linestyle="--", marker="s", label=FRONTIER_LABEL)


def _macs_axis(ax: Any, xs: list[np.ndarray]) -> None:
    """Logarithmic when the MACs drawn span more than `LOG_X_RATIO`, and labelled so."""
    x = np.concatenate(xs) if xs else np.zeros(0)
    x = x[np.isfinite(x) & (x > 0)]
    log = x.size > 0 and x.max() / x.min() > LOG_X_RATIO
    if log:
        _log_axis(ax)
    ax.set_xlabel(f"expected MACs per image (M{', log scale' if log else ''})")


def plot_exit_distribution(
    path: str | Path,
    exit_share: Sequence[float] | np.ndarray,
    exit_labels: Sequence[str],
    title: str,
) -> Figure:
    """Bar chart of the share of images (%) that leave at each exit."""
    share = np.asarray(exit_share, dtype=float) * 100
    if len(exit_labels) != len(share):
        raise ValueError(f"{len(exit_labels)} exit labels for {len(share)} exits")
    fig, ax = _figure((6.4, 4.0))
    bars = ax.bar(range(len(share)), share, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(share)), list(exit_labels))
    ax.set_xlabel("exit")
    ax.set_ylabel("images leaving at this exit (%)")
    ax.set_ylim(0, 108)  # room for a label above a 100 % bar
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path)
    return fig


def _reference_star(reference: Reference) -> dict | None:
    """The reference's test point, drawn as a star (none when it is the run's own final exit,
    which the exit markers already show)."""
    if reference.label == OWN_REFERENCE:
        return None
    return {
        "label": f"{reference.label}, test",
        "macs": reference.macs,
        "accuracy": reference.test_accuracy,
    }


def _bars(ax: Any, groups: dict[str, list[float | None]], ylabel: str, title: str) -> None:
    """Grouped bars, one group per exit; a missing value (None) draws no bar."""
    width = 0.8 / len(groups)
    for g, (label, values) in enumerate(groups.items()):
        x = [i + (g - (len(groups) - 1) / 2) * width for i in range(len(values))]
        ax.bar(x, [np.nan if v is None else v for v in values], width, label=label)
    n = len(next(iter(groups.values())))
    ax.set_xticks(range(n), [f"exit {i + 1}" for i in range(n)])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def plot_diagnostics(path: str | Path, report: Report) -> Figure:
    """`diagnostics.png`: per exit, calibration and ranking; the exit score on images the
    reference gets right and wrong; and where all and teacher-wrong images exit at the chosen
    threshold (without a reference run the teacher parts say n/a)."""
    d = report.diagnostics
    if d is None:
        raise ValueError("the report has no diagnostics to plot")
    per_exit = d.per_exit
    fig, axes = _figure((18.0, 4.0), ncols=4)
    fig.set_layout_engine("constrained")
    # ECE (about 1 %) and AUROC (50-100 %) on one axis would hide ECE: one panel each.
    _bars(axes[0], {"ECE": [100 * x.ece for x in per_exit]}, "ECE (%)", "calibration (test)")
    auroc = [None if x.auroc is None else x.auroc for x in per_exit]
    _bars(axes[1], {"AUROC": auroc}, "AUROC, right vs wrong", "ranking (test)")
    axes[1].axhline(0.5, color="grey", linestyle=":", linewidth=1)
    shares = {"all images": [100 * s for s in report.chosen.test_exit_share]}
    if d.teacher_wrong_share is None:
        axes[2].set_axis_off()
        axes[2].text(0.5, 0.5, "exit score by teacher answer:\nn/a, no --reference", ha="center")
    else:
        scores = {
            "teacher right": [x.mean_score_teacher_right for x in per_exit],
            "teacher wrong": [x.mean_score_teacher_wrong for x in per_exit],
        }
        _bars(axes[2], scores, f"mean {report.policy} score", "exit score by teacher answer (test)")
        count = "" if d.teacher_wrong_images is None else f" (n = {d.teacher_wrong_images})"
        shares[f"teacher-wrong images{count}"] = [
            None if x.teacher_wrong_exit_share is None else 100 * x.teacher_wrong_exit_share
            for x in per_exit
        ]
    title = f"where test images exit at threshold {report.chosen.threshold:.3g}"
    _bars(axes[3], shares, "images leaving here (%)", title)
    fig.suptitle(f"{report.model} ({report.method}): mechanism diagnostics", fontsize=11)
    _save(fig, path)
    return fig


def plot_run(out: ReportDir, summary: RunSummary) -> dict[str, Figure]:
    """`tradeoff.png` (the val and test curves, each exit and the chosen point on both),
    `exits.png` (where test images exit at the chosen threshold) and `diagnostics.png` of
    `erde evaluate`; the figures by file name."""
    r, c = summary.report, summary.report.chosen
    series = [
        Series(
            split,
            *break_gaps(curve),
            exits=(r.exit_macs, r.per_exit_accuracy[split]),
            chosen=chosen,
        )
        for split, curve, chosen in (
            ("val", summary.val_curve, (c.val_expected_macs, c.val_accuracy)),
            ("test", summary.test_curve, (c.test_expected_macs, c.test_accuracy)),
        )
    ]
    tradeoff = plot_tradeoff(
        out.tradeoff_png,
        series,
        _reference_star(r.reference),
        title=f"{r.model} ({r.method}): accuracy vs MACs, {r.policy} policy",
        chosen_label=f"chosen operating point (threshold {c.threshold:.3g})",
    )
    exits = plot_exit_distribution(
        out.exits_png,
        c.test_exit_share,
        [f"exit {i + 1}" for i in range(len(r.exit_macs))],
        title=f"test split: where images exit at threshold {c.threshold:.3g}",
    )
    return {
        out.tradeoff_png.name: tradeoff,
        out.exits_png.name: exits,
        out.diagnostics_png.name: plot_diagnostics(out.diagnostics_png, r),
    }


def _group_series(label: str, reports: list[Report], curves: list[Curve]) -> Series:
    """A group's test curve, exits and chosen point, each the mean over its seeds."""
    macs, mean, std = mean_std_curves(curves, max_gap=GAP)
    n = len(reports)
    return Series(
        label if n == 1 else f"{label}, {n} seeds",
        macs,
        mean,
        std if n > 1 else None,
        seeds=n,
        exits=(
            reports[0].exit_macs,
            np.mean([r.per_exit_accuracy["test"] for r in reports], axis=0),
        ),
        chosen=(
            float(np.mean([r.chosen.test_expected_macs for r in reports])),
            float(np.mean([r.chosen.test_accuracy for r in reports])),
        ),
    )


def plot_comparison(path: str | Path, comparison: Comparison) -> Figure:
    """Every group's test curve (seeds averaged, mean ± std band), its exits and chosen point
    (means over the seeds), the reference's star, and the static runs as the static frontier."""
    groups = comparison.groups.values()
    static = static_points(comparison)
    plain = {p.label for p in static}
    series = [
        _group_series(label, [s.report for s in runs], [s.test_curve for s in runs])
        for label, runs in comparison.groups.items()
        if label not in plain
    ]
    several = any(len(runs) > 1 for runs in groups)
    return plot_tradeoff(
        path,
        series,
        _reference_star(comparison.reference),
        title=f"test split: accuracy vs expected MACs ({comparison.policy} policy)",
        chosen_label="chosen operating point" + (" (mean over seeds)" if several else ""),
        static=static,
    )
