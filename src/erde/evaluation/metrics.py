"""Summary numbers of an accuracy-versus-MACs curve."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import trapezoid

from erde.errors import ErdeError
from erde.evaluation.policy import check_logits
from erde.evaluation.sweep import Curve, check_labels


def per_exit_accuracy(logits: torch.Tensor, labels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Accuracy (fraction) of every exit when it answers for all images."""
    check_logits(logits)
    n, _, k = logits.shape
    labels = check_labels(labels, n, k)
    return (logits.argmax(dim=-1) == labels[:, None]).double().mean(dim=0).numpy()


def auc(curve: Curve, full_macs: float | None = None) -> float:
    """Mean accuracy over the compute range the early-exit model can reach.

    Definition: x = expected MACs / ``full_macs`` (default: the curve's last-exit cost), y =
    accuracy. Points are sorted by x and joined by straight lines; beyond the first and last point
    the accuracy is held constant. The area under that line from x0 = first exit's MACs /
    ``full_macs`` to x = 1 is divided by (1 - x0), so a flat curve's AUC is its accuracy and the
    result is comparable between models with different exit costs.
    """
    full = float(curve.cum_macs[-1]) if full_macs is None else float(full_macs)
    if not math.isfinite(full) or full < curve.cum_macs[-1]:
        raise ErdeError(
            f"full_macs must be at least the curve's last-exit cost ({curve.cum_macs[-1]:.6g} "
            f"MACs); got {full_macs}. Pass the full model's MACs per image."
        )
    lo = float(curve.cum_macs[0]) / full
    order = np.lexsort((curve.accuracy, curve.expected_macs))
    x = np.clip(curve.expected_macs[order] / full, lo, 1.0)
    y = curve.accuracy[order]
    if lo >= 1.0:  # a single exit: no trade-off to integrate
        return float(y.mean())
    x = np.concatenate([[lo], x, [1.0]])
    y = np.concatenate([y[:1], y, y[-1:]])
    return float(trapezoid(y, x) / (1.0 - lo))


def macs_at_accuracy(
    curve: Curve, reference_accuracy: float, tolerance: float = 0.0
) -> float | None:
    """Fewest expected MACs at which the curve reaches ``reference_accuracy - tolerance``."""
    ok = curve.accuracy >= reference_accuracy - tolerance
    return float(curve.expected_macs[ok].min()) if ok.any() else None


def reduction_factor(reference_macs: float, macs: float) -> float:
    """How many times fewer MACs ``macs`` is than ``reference_macs`` (10 = ten times fewer)."""
    if not macs > 0 or not reference_macs > 0:
        raise ErdeError(
            f"MACs must be positive to compare them; got reference={reference_macs}, macs={macs}."
        )
    return float(reference_macs) / float(macs)


def check_budget(curve: Curve, budget_macs: float) -> None:
    """A budget must lie between the first exit's cost and the full model's."""
    lo, hi = float(curve.cum_macs[0]), float(curve.cum_macs[-1])
    if not lo <= budget_macs <= hi:
        raise ErdeError(
            f"a MACs budget of {budget_macs:.6g} per image is outside what this model can spend: "
            f"[{lo:.6g}, {hi:.6g}] MACs (first exit to full model). Choose a budget in that range."
        )


def accuracy_at_budget(curve: Curve, budget_macs: float) -> float:
    """Best accuracy among the curve's thresholds whose expected MACs fit the budget."""
    check_budget(curve, budget_macs)
    ok = curve.expected_macs <= budget_macs
    if not ok.any():
        raise ErdeError(
            f"no threshold on this curve spends at most {budget_macs:.6g} MACs per image; "
            "sweep with larger thresholds (the default grid includes one)."
        )
    return float(curve.accuracy[ok].max())
