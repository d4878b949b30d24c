"""Summary numbers of an accuracy-versus-MACs curve."""

from __future__ import annotations

import math

import numpy as np
import torch

from erde.errors import ErdeError
from erde.evaluation.policy import check_logits
from erde.evaluation.scores import check_labels
from erde.evaluation.sweep import Curve


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
    full = float(curve.exit_macs[-1]) if full_macs is None else float(full_macs)
    if not math.isfinite(full) or full < curve.exit_macs[-1]:
        raise ErdeError(
            f"full_macs must be at least the curve's last-exit cost ({curve.exit_macs[-1]:.6g} "
            f"MACs); got {full_macs}. Pass the full model's MACs per image."
        )
    lo = float(curve.exit_macs[0]) / full
    order = np.lexsort((curve.accuracy, curve.expected_macs))
    x = np.clip(curve.expected_macs[order] / full, lo, 1.0)
    y = curve.accuracy[order]
    if lo >= 1.0:  # a single exit: no trade-off to integrate
        return float(y.mean())
    from scipy.integrate import trapezoid  # a second to import: only evaluation needs it

    x = np.concatenate([[lo], x, [1.0]])
    y = np.concatenate([y[:1], y, y[-1:]])
    return float(trapezoid(y, x) / (1.0 - lo))
