"""Reusable report writers: CSV, JSON, markdown tables and PNG plots.

Units in, units out: curves carry accuracy as a fraction and MACs per image; the plots show
accuracy in % and MACs in millions (M). Every file goes through the project's one atomic writer
(`erde.checkpoint.write_bytes`), so an interrupted run never leaves a half-written report and a
full disk is a clear message. Plots render on matplotlib's Agg canvas without pyplot, so no
display is needed and no global state changes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from erde.checkpoint import write_bytes
from erde.errors import ErdeError
from erde.evaluation.sweep import Curve

DPI = 150


def write_curve_csv(path: str | os.PathLike, curve: Curve) -> None:
    """One row per threshold: threshold, accuracy (fraction), expected MACs, share per exit."""
    rows = curve.to_rows()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(Path(path), buf.getvalue().encode())


def _jsonable(obj: Any) -> Any:
    """Plain JSON values; NaN and infinities become null so strict parsers accept the file."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return _jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented JSON that accepts numpy/torch values and dataclasses."""
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n"
    write_bytes(Path(path), text.encode())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 4 significant digits, other values ``str``."""

    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, headers have {len(headers)}: {row}")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _figure(size: tuple[float, float]) -> tuple[Figure, Any]:
    """A pyplot-free figure on the Agg canvas: no display, no global backend switch."""
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Figure, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    write_bytes(Path(path), buf.getvalue())


def plot_tradeoff(
    path: str | os.PathLike,
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
    path: str | os.PathLike,
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


def _accuracy_of_macs(curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    """The curve as a function of MACs: thresholds with equal MACs are averaged."""
    macs, inverse = np.unique(curve.expected_macs, return_inverse=True)
    acc = np.bincount(inverse, weights=curve.accuracy) / np.bincount(inverse)
    return macs, acc


def mean_std_curves(
    curves: Sequence[Curve], n_points: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std accuracy of several seeds' curves on one MACs grid.

    Each curve is read as accuracy as a function of expected MACs (points with equal MACs
    averaged, straight lines between points) and sampled on ``n_points`` evenly spaced MACs over
    the range every curve covers, so nothing is extrapolated. The std is the sample standard
    deviation across curves (ddof=1; zero for a single curve).
    """
    if not curves:
        raise ValueError("mean_std_curves needs at least one curve")
    functions = [_accuracy_of_macs(c) for c in curves]
    lo = max(m[0] for m, _ in functions)
    hi = min(m[-1] for m, _ in functions)
    if lo > hi:
        raise ErdeError(
            f"these curves share no MACs range ([{lo:.6g}, {hi:.6g}] is empty); average only "
            "seeds of the same model."
        )
    grid = np.linspace(lo, hi, n_points)
    acc = np.stack([np.interp(grid, m, a) for m, a in functions])
    std = acc.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(n_points)
    return grid, acc.mean(axis=0), std
