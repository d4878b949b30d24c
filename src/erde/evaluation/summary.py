"""The numbers a report states about one run, from its logits cache.

Thresholds are always chosen on the validation curve and then applied once to the test split; the
test curve is only described (per-exit accuracy, AUC), never searched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from erde.errors import ErdeError
from erde.evaluation.cache import LogitsCache
from erde.evaluation.calibrate import (
    apply,
    calibrate_for_accuracy,
    calibrate_for_budget,
    resolve_budget,
)
from erde.evaluation.metrics import auc, per_exit_accuracy
from erde.evaluation.sweep import Curve, sweep


@dataclass
class Reference:
    """The model whose accuracy a student must keep: by default the teacher's final exit."""

    label: str
    val_accuracy: float
    test_accuracy: float
    macs: float  # per image, of the reference run as a plain network


@dataclass
class RunSummary:
    summary: dict
    val_curve: Curve
    test_curve: Curve


def reference_from_cache(cache: LogitsCache, label: str, static_macs: float) -> Reference:
    return Reference(
        label,
        float(per_exit_accuracy(cache.logits["val"], cache.labels["val"])[-1]),
        float(per_exit_accuracy(cache.logits["test"], cache.labels["test"])[-1]),
        float(static_macs),
    )


def check_max_drop(max_drop: float) -> None:
    if not max_drop >= 0:
        raise ErdeError(f"--max-drop {max_drop} must be >= 0 accuracy points")


def summarize(
    cache: LogitsCache,
    *,
    policy: str = "entropy",
    normalize: bool = False,
    reference: Reference | None = None,
    max_drop: float = 0.0,
    budgets: Sequence[float] = (0.25, 0.5),
    budget: float | None = None,
) -> RunSummary:
    """Per-exit accuracy, AUC, the val-calibrated operating points and what they give on test.

    `max_drop` is in accuracy points below the reference; `budgets` are default operating points
    (skipped when outside the model's range); `budget` is the user's own one and must fit.
    """
    check_max_drop(max_drop)
    macs = cache.exit_macs
    full = float(macs[-1])
    curves = {
        s: sweep(cache.logits[s], cache.labels[s], macs, policy=policy, normalize=normalize)
        for s in ("val", "test")
    }
    per_exit = {
        s: per_exit_accuracy(cache.logits[s], cache.labels[s]).tolist() for s in ("val", "test")
    }
    if reference is None:
        reference = Reference(
            "the run's own final exit", per_exit["val"][-1], per_exit["test"][-1], full
        )

    def operating_point(calibration, target: float | None = None) -> dict:
        """`target`: the val accuracy the point had to keep; `reached` says whether it did
        (else the calibration fell back to the full model and the point is not a saving)."""
        test = apply(
            cache.logits["test"], cache.labels["test"], macs, calibration, policy, normalize
        )
        return {
            "threshold": calibration.threshold,
            "criterion": calibration.criterion,
            "val_accuracy": calibration.val_accuracy,
            "val_expected_macs": calibration.val_expected_macs,
            "test_accuracy": test["accuracy"],
            "test_expected_macs": test["expected_macs"],
            "test_exit_share": test["exit_share"],
            "reduction_vs_reference": reference.macs / test["expected_macs"],
            "reduction_vs_own_full": full / test["expected_macs"],
            "reached": target is None or calibration.val_accuracy >= target,
        }

    def keep(accuracy: float) -> dict:
        target = accuracy - max_drop / 100.0
        return operating_point(calibrate_for_accuracy(curves["val"], target), target)

    at_reference = keep(reference.val_accuracy)
    at_own = keep(per_exit["val"][-1])
    at_budgets = {}
    for fraction in budgets:
        try:
            b = resolve_budget(fraction, full)
            at_budgets[f"{fraction:g}"] = operating_point(calibrate_for_budget(curves["val"], b))
        except ErdeError:
            at_budgets[f"{fraction:g}"] = None  # below the first exit: no such operating point
    chosen = at_reference
    if budget is not None:
        chosen = operating_point(calibrate_for_budget(curves["val"], resolve_budget(budget, full)))
    summary = {
        "policy": policy,
        "normalize": normalize,
        "exit_macs": list(macs),
        "per_exit_accuracy": per_exit,
        "test_auc": auc(curves["test"], full),
        "reference": vars(reference),
        "max_drop_points": max_drop,
        "at_reference_accuracy": at_reference,
        "at_own_full_accuracy": at_own,
        "at_budget_fraction": at_budgets,
        "chosen": chosen,
    }
    return RunSummary(summary, curves["val"], curves["test"])
