"""PNG plots of evaluations and comparisons.

Units in, units out: accuracy comes as a fraction and MACs per image; the plots show accuracy in %
and MACs in millions (M). They render on matplotlib's Agg canvas without pyplot, so no display is
needed and no global state changes, and every file goes through the one atomic writer.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from erde.evaluation.compare import Comparison, mean_std_curves
from erde.evaluation.summary import RunSummary
from erde.files import write_bytes
from erde.report import Reference, Report
from erde.rundir import ReportDir

DPI = 150


def _figure(size: tuple[float, float], ncols: int = 1) -> tuple[Figure, Any]:
    """A pyplot-free figure on the Agg canvas: no display, no global backend switch."""
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _save(fig: Figure, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    write_bytes(Path(path), buf.getvalue())


def plot_tradeoff(
    path: str | Path,
    series: Sequence[dict],
    reference: dict | None = None,
    *,
    title: str,
) -> None:
    """Accuracy (%) versus expected MACs per image (M), one line per series.

    ``series``: dicts {label, macs, accuracy, std (or None)} with MACs per image and accuracy as
    a fraction; ``std`` draws a mean +/- std band. ``reference``: {label, macs, accuracy} drawn as
    a star (e.g. the teacher's full model). Name the split (val/test) in ``title`` or the labels.
    """
    fig, ax = _figure((6.4, 4.4))
    for s in series:
        macs = np.asarray(s["macs"], dtype=float) / 1e6
        acc = np.asarray(s["accuracy"], dtype=float) * 100
        order = np.argsort(macs, kind="stable")
        (line,) = ax.plot(macs[order], acc[order], label=s["label"], linewidth=1.5)
        if s.get("std") is not None:
            std = np.asarray(s["std"], dtype=float)[order] * 100
            ax.fill_between(
                macs[order], acc[order] - std, acc[order] + std, color=line.get_color(), alpha=0.2
            )
    if reference is not None:
        ax.plot(
            [reference["macs"] / 1e6],
            [reference["accuracy"] * 100],
            marker="*",
            markersize=12,
            linestyle="none",
            color="black",
            label=reference["label"],
        )
    ax.set_xlabel("expected MACs per image (M)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    _save(fig, path)


def plot_exit_distribution(
    path: str | Path,
    exit_share: Sequence[float] | np.ndarray,
    exit_labels: Sequence[str],
    title: str,
) -> None:
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


def _reference_star(reference: Reference) -> dict:
    """The reference's test point, drawn as a star."""
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


def plot_diagnostics(path: str | Path, report: Report) -> None:
    """`diagnostics.png`: per exit, calibration and ranking; the exit score on images the
    reference gets right and wrong; and where all and teacher-wrong images exit at the chosen
    threshold (without a reference run the teacher parts say n/a)."""
    d = report.diagnostics
    if d is None:
        raise ValueError("the report has no diagnostics to plot")
    per_exit = d.per_exit
    fig, axes = _figure((14.0, 4.0), ncols=3)
    fig.set_layout_engine("constrained")
    auroc = [None if x.auroc is None else 100 * x.auroc for x in per_exit]
    ranking = {"ECE (%)": [100 * x.ece for x in per_exit], "AUROC right vs wrong (%)": auroc}
    _bars(axes[0], ranking, "%", "calibration and ranking (test)")
    shares = {"all images": [100 * s for s in report.chosen.test_exit_share]}
    if d.teacher_wrong_share is None:
        axes[1].set_axis_off()
        axes[1].text(0.5, 0.5, "exit score by teacher answer:\nn/a, no --reference", ha="center")
    else:
        scores = {
            "teacher right": [x.mean_score_teacher_right for x in per_exit],
            "teacher wrong": [x.mean_score_teacher_wrong for x in per_exit],
        }
        _bars(axes[1], scores, f"mean {report.policy} score", "exit score by teacher answer (test)")
        shares["teacher-wrong images"] = [
            None if x.teacher_wrong_exit_share is None else 100 * x.teacher_wrong_exit_share
            for x in per_exit
        ]
    title = f"where test images exit at threshold {report.chosen.threshold:.3g}"
    _bars(axes[2], shares, "images leaving here (%)", title)
    fig.suptitle(f"{report.model} ({report.method}): mechanism diagnostics", fontsize=11)
    _save(fig, path)


def plot_run(out: ReportDir, summary: RunSummary) -> None:
    """`tradeoff.png` (the val and test curves), `exits.png` (where test images exit at the
    chosen threshold) and `diagnostics.png` of `erde evaluate`."""
    r = summary.report
    curves = {"val": summary.val_curve, "test": summary.test_curve}
    series = [
        {"label": s, "macs": c.expected_macs, "accuracy": c.accuracy, "std": None}
        for s, c in curves.items()
    ]
    plot_tradeoff(
        out.tradeoff_png,
        series,
        _reference_star(r.reference),
        title=f"{r.model} ({r.method}): accuracy vs MACs, {r.policy} policy",
    )
    plot_exit_distribution(
        out.exits_png,
        r.chosen.test_exit_share,
        [f"exit {i + 1}" for i in range(len(r.exit_macs))],
        title=f"test split: where images exit at threshold {r.chosen.threshold:.3g}",
    )
    plot_diagnostics(out.diagnostics_png, r)


def plot_comparison(path: str | Path, comparison: Comparison) -> None:
    """Every group's test curve, seeds averaged (mean ± std band), and the reference's star."""
    series = []
    for label, runs in comparison.groups.items():
        macs, mean, std = mean_std_curves([s.test_curve for s in runs])
        series.append(
            {
                "label": f"{label}, n={len(runs)}",
                "macs": macs,
                "accuracy": mean,
                "std": std if len(runs) > 1 else None,
            }
        )
    plot_tradeoff(
        path,
        series,
        _reference_star(comparison.reference),
        title=f"test split: accuracy vs expected MACs ({comparison.policy} policy)",
    )
