"""Accuracy and expected MACs for many exit thresholds at once.

With one theta shared by all exits, an image leaves at the first exit e < E-1 whose score is below
theta. Let m_e be the prefix minimum of its scores over exits 0..e (e < E-1). Because m is
non-increasing, the exit taken at theta is the number of e < E-1 with m_e >= theta. So the count
of images that go past exit e is #{n : m_ne >= theta}, a sorted-array lookup, and the number of
correct answers telescopes over exits: correct(exit) = c_0 + sum_{e < exit} (c_{e+1} - c_e).
Sorting each exit's m once and binary-searching every theta gives all T points in
O(N E log N + T E log N), with no Python loop over images or thresholds.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from erde.errors import ErdeError
from erde.evaluation.policy import check_logits, confidence_scores
from erde.evaluation.scores import ExitScores, check_labels
from erde.files import write_text


@dataclass
class Curve:
    """One point per threshold; accuracy is a fraction, MACs are per image.

    ``thresholds`` hold the float32 values the comparisons used (as float64), so passing any of
    them to ``simulate`` reproduces its point exactly. ``exit_macs`` are the cumulative per-exit
    costs the curve was computed with; metrics use them for the valid MACs range.
    """

    thresholds: np.ndarray  # T
    accuracy: np.ndarray  # T
    expected_macs: np.ndarray  # T
    exit_share: np.ndarray  # T x E, rows sum to 1
    exit_macs: np.ndarray  # E

    def to_rows(self) -> list[dict[str, float]]:
        """One dict per threshold, keyed by CSV column name."""
        rows = []
        for t in range(len(self.thresholds)):
            row = {
                "threshold": float(self.thresholds[t]),
                "accuracy": float(self.accuracy[t]),
                "expected_macs": float(self.expected_macs[t]),
            }
            for e, share in enumerate(self.exit_share[t], start=1):  # exits 1..n, as reports
                row[f"exit{e}_share"] = float(share)
            rows.append(row)
        return rows


def write_curve_csv(path: str | Path, curve: Curve) -> None:
    """One row per threshold: threshold, accuracy (fraction), expected MACs, share per exit."""
    rows = curve.to_rows()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(Path(path), buf.getvalue())


def check_exit_macs(exit_macs: Sequence[float] | np.ndarray, n_exits: int) -> np.ndarray:
    """Cumulative per-exit MACs: one per exit, positive and increasing."""
    macs = np.asarray(exit_macs, dtype=np.float64).reshape(-1)
    if macs.shape != (n_exits,) or not np.all(np.isfinite(macs)) or np.any(macs <= 0):
        raise ErdeError(
            f"cumulative MACs must be {n_exits} positive numbers, one per exit; got "
            f"{macs.tolist()}. Recompute them with erde.models.macs for this model."
        )
    if np.any(np.diff(macs) <= 0):
        raise ErdeError(
            f"cumulative MACs must increase from the first exit to the last; got {macs.tolist()}. "
            "Pass them in exit order (first to last)."
        )
    return macs


def prefix_min(scores: np.ndarray) -> np.ndarray:
    """m_e = min over exits 0..e of the score, for the E-1 exits that can decide (N x E-1)."""
    return np.minimum.accumulate(scores[:, :-1], axis=1)


def grid_from_scores(scores: np.ndarray, n: int = 1000) -> np.ndarray:
    """At most ``n`` float32 thresholds from 0 to just above the largest deciding score.

    The curve only changes where theta crosses a prefix-minimum score, so quantiles of those
    values place points evenly in "share of images affected", which draws a smooth curve.
    """
    if n < 2:
        raise ErdeError(f"a threshold grid needs at least 2 points; got n={n}.")
    m = prefix_min(scores).reshape(-1)
    if m.size == 0:  # a single exit: every threshold gives the same point
        return np.zeros(1)
    top = np.nextafter(np.float32(m.max()), np.float32(np.inf))
    inner = np.quantile(m, np.linspace(0.0, 1.0, n - 2), method="inverted_cdf")
    grid = np.unique(np.concatenate([[0.0], inner, [top]]).astype(np.float32))
    return grid.astype(np.float64)


def default_thresholds(
    logits: torch.Tensor, policy: str = "entropy", normalize: bool = False, n: int = 1000
) -> np.ndarray:
    """A grid of at most ``n`` thresholds spanning 'full model' (0) to 'always first exit'."""
    return grid_from_scores(confidence_scores(logits, policy, normalize).numpy(), n)


def sweep_from_scores(
    scores: np.ndarray, correct: np.ndarray, exit_macs: np.ndarray, thresholds: np.ndarray
) -> Curve:
    """The curve from precomputed scores (N x E float32) and correctness (N x E bool)."""
    n, e = scores.shape
    # the same float64 -> float32 rounding as `simulate` (huge values become inf, silently)
    theta = torch.as_tensor(np.asarray(thresholds, dtype=np.float64)).float().numpy()
    m = prefix_min(scores.astype(np.float32))
    gain = np.diff(correct.astype(np.int64), axis=1)  # c_{e+1} - c_e, N x E-1
    passed = np.empty((e, len(theta)), dtype=np.int64)  # images going past exit e
    extra_correct = np.zeros(len(theta), dtype=np.int64)
    for j in range(e - 1):  # loop over exits only
        order = np.argsort(m[:, j], kind="stable")
        first_ge = np.searchsorted(m[order, j], theta, side="left")  # m >= theta from here on
        passed[j] = n - first_ge
        suffix = np.concatenate([np.cumsum(gain[order, j][::-1])[::-1], [0]])
        extra_correct += suffix[first_ge]
    passed[e - 1] = 0
    leaving = np.concatenate([np.full((1, len(theta)), n), passed[:-1]]) - passed
    share = (leaving / n).T if n else np.zeros((len(theta), e))
    accuracy = (correct[:, 0].sum() + extra_correct) / n if n else np.zeros(len(theta))
    return Curve(
        thresholds=theta.astype(np.float64),
        accuracy=np.asarray(accuracy, dtype=np.float64),
        expected_macs=share @ exit_macs,
        exit_share=share,
        exit_macs=exit_macs,
    )


def sweep(
    logits: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    exit_macs: Sequence[float] | np.ndarray,
    thresholds: Sequence[float] | np.ndarray | None = None,
    policy: str = "entropy",
    normalize: bool = False,
) -> Curve:
    """Accuracy, expected MACs and exit shares of one split at every threshold.

    Each point equals ``simulate(logits, theta, policy, normalize)`` scored against ``labels``.
    Without ``thresholds`` the grid comes from ``default_thresholds``.
    """
    check_logits(logits)
    n, e, k = logits.shape
    check_labels(labels, n, k)
    check_exit_macs(exit_macs, e)  # before scoring: mistakes are named in the same order
    return sweep_scores(ExitScores.of(logits, labels, policy, normalize), exit_macs, thresholds)


def sweep_scores(
    split: ExitScores,
    exit_macs: Sequence[float] | np.ndarray,
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> Curve:
    """``sweep`` of a split scored once, so its curve costs no second scoring."""
    macs = check_exit_macs(exit_macs, split.n_exits)
    scores = split.scores.numpy()
    if thresholds is None:
        thresholds = grid_from_scores(scores)
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thresholds.size == 0 or np.isnan(thresholds).any() or (thresholds < 0).any():
        raise ErdeError(
            "sweep thresholds must be a non-empty list of non-negative numbers; "
            "leave them out to use the default grid."
        )
    return sweep_from_scores(scores, split.correct.numpy(), macs, thresholds)
