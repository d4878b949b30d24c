"""Choose an exit threshold on the validation split, then report it once on the test split.

The choosing functions take only a validation ``Curve`` (``val_curve``): test data cannot reach
them, so a reported test number never leaks into the threshold it is reported for. ``apply`` is
the one place test data enters, after the choice is fixed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from erde.errors import ErdeError
from erde.evaluation.policy import check_logits
from erde.evaluation.scores import ExitScores, check_labels
from erde.evaluation.sweep import Curve, check_exit_macs
from erde.run.report import OperatingPoint
from erde.run.units import millions, percent


@dataclass
class Calibration:
    """A threshold chosen on validation data, with the validation numbers that justified it.

    `reached` is False when an accuracy target was met at no threshold (the full model is used).
    """

    threshold: float
    val_accuracy: float
    val_expected_macs: float
    criterion: str
    reached: bool = True


def resolve_budget(value: float, full_macs: float) -> float:
    """A budget in MACs per image: ``value <= 1`` is a fraction of the full model, else MACs."""
    if math.isnan(value) or value <= 0:
        raise ErdeError(
            f"a MACs budget must be positive; got {value}. Use a fraction of the full model "
            "(e.g. 0.5) or MACs per image (e.g. 2e7)."
        )
    budget = value * full_macs if value <= 1 else float(value)
    if budget > full_macs:
        raise ErdeError(
            f"a MACs budget of {budget:.6g} per image exceeds the full model's {full_macs:.6g}; "
            "use at most the full model's MACs, or a fraction <= 1."
        )
    return budget


def check_budget(budget_macs: float, macs_range: tuple[float, float]) -> None:
    """A budget must lie between the first exit's cost and the full model's (`macs_range`)."""
    lo, hi = (float(m) for m in macs_range)
    if not lo <= budget_macs <= hi:
        raise ErdeError(
            f"a MACs budget of {millions(budget_macs, 6)} per image is outside what this model can "
            f"spend: {millions(lo, 6)} to {millions(hi, 6)} MACs (first exit to full model). "
            "Choose a budget in that range."
        )


def _pick(val_curve: Curve, index: int, criterion: str) -> Calibration:
    return Calibration(
        threshold=float(val_curve.thresholds[index]),
        val_accuracy=float(val_curve.accuracy[index]),
        val_expected_macs=float(val_curve.expected_macs[index]),
        criterion=criterion,
    )


def calibrate_for_budget(val_curve: Curve, budget_macs: float) -> Calibration:
    """The validation threshold with the best val accuracy within the budget (ties: fewer MACs)."""
    check_budget(budget_macs, (val_curve.exit_macs[0], val_curve.exit_macs[-1]))
    ok = np.flatnonzero(val_curve.expected_macs <= budget_macs)
    if ok.size == 0:
        raise ErdeError(
            f"no validation threshold spends at most {millions(budget_macs)} MACs per image; "
            "sweep with larger thresholds (the default grid includes one)."
        )
    # lexsort keys: last is primary -> highest accuracy, then fewest MACs, then lowest threshold.
    order = np.lexsort(
        (val_curve.thresholds[ok], val_curve.expected_macs[ok], -val_curve.accuracy[ok])
    )
    return _pick(
        val_curve,
        int(ok[order[0]]),
        f"highest val accuracy with val expected MACs <= {millions(budget_macs)} per image",
    )


def calibrate_for_accuracy(val_curve: Curve, target_accuracy: float) -> Calibration:
    """The validation threshold with the fewest val MACs that reaches the target accuracy.

    If no threshold reaches it, the full model (threshold 0) is returned and the criterion says so.
    """
    if math.isnan(target_accuracy) or not 0.0 <= target_accuracy <= 1.0:
        hint = f" (did you mean {target_accuracy / 100:g}?)" if 1 < target_accuracy <= 100 else ""
        raise ErdeError(f"a target accuracy is a fraction in [0, 1]; got {target_accuracy}{hint}.")
    ok = np.flatnonzero(val_curve.accuracy >= target_accuracy)
    if ok.size:
        order = np.lexsort(
            (val_curve.thresholds[ok], -val_curve.accuracy[ok], val_curve.expected_macs[ok])
        )
        return _pick(
            val_curve,
            int(ok[order[0]]),
            f"fewest val expected MACs with val accuracy >= {percent(target_accuracy)}",
        )
    full = np.flatnonzero(val_curve.exit_share[:, -1] == 1.0)
    if full.size == 0:
        raise ErdeError(
            "the validation curve has no full-model point to fall back to; include threshold 0 "
            "in the sweep (the default grid does)."
        )
    return Calibration(
        threshold=0.0,
        val_accuracy=float(val_curve.accuracy[full[0]]),
        val_expected_macs=float(val_curve.expected_macs[full[0]]),
        criterion=f"val accuracy >= {percent(target_accuracy)} is not reached at any threshold; "
        "using the full model (threshold 0)",
        reached=False,
    )


def apply(
    test_logits: torch.Tensor,
    test_labels: torch.Tensor | np.ndarray,
    exit_macs: Sequence[float] | np.ndarray,
    calibration: Calibration,
    policy: str = "entropy",
    normalize: bool = False,
    reference_macs: float | None = None,
) -> OperatingPoint:
    """The operating point: the calibrated threshold and what it gives on the test split.

    ``policy`` and ``normalize`` must be those the validation curve was swept with;
    ``reference_macs`` (default: the full model's) is what the MACs reduction is measured against.
    """
    check_logits(test_logits)
    n, e, k = test_logits.shape
    check_labels(test_labels, n, k)
    check_exit_macs(exit_macs, e)  # before scoring: mistakes are named in the same order
    test = ExitScores.of(test_logits, test_labels, policy, normalize)
    return apply_scores(test, exit_macs, calibration, reference_macs)


def apply_scores(
    test: ExitScores,
    exit_macs: Sequence[float] | np.ndarray,
    calibration: Calibration,
    reference_macs: float | None = None,
) -> OperatingPoint:
    """``apply`` to a test split scored once, so every operating point reuses its scores."""
    n, e = test.scores.shape
    macs = check_exit_macs(exit_macs, e)
    exit_index, prediction = test.simulate(calibration.threshold)
    share = torch.bincount(exit_index, minlength=e).double().numpy() / max(n, 1)
    expected_macs = float(share @ macs)
    reference = float(macs[-1]) if reference_macs is None else float(reference_macs)
    return OperatingPoint(
        threshold=calibration.threshold,
        criterion=calibration.criterion,
        val_accuracy=calibration.val_accuracy,
        val_expected_macs=calibration.val_expected_macs,
        test_accuracy=float((prediction == test.labels).double().mean()) if n else float("nan"),
        test_expected_macs=expected_macs,
        test_exit_share=share.tolist(),
        reduction_vs_reference=reference / expected_macs,
        reduction_vs_own_full=float(macs[-1]) / expected_macs,
        reached=calibration.reached,
    )
