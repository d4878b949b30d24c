"""Evaluation on cached per-exit logits: exit policies, threshold sweeps, metrics, calibration."""

from erde.evaluation.calibrate import (
    Calibration,
    apply,
    calibrate_for_accuracy,
    calibrate_for_budget,
    resolve_budget,
)
from erde.evaluation.metrics import (
    accuracy_at_budget,
    auc,
    macs_at_accuracy,
    per_exit_accuracy,
    reduction_factor,
)
from erde.evaluation.policy import POLICIES, confidence_scores, maxprob_threshold, simulate
from erde.evaluation.sweep import Curve, default_thresholds, sweep

__all__ = [
    "POLICIES",
    "Calibration",
    "Curve",
    "accuracy_at_budget",
    "apply",
    "auc",
    "calibrate_for_accuracy",
    "calibrate_for_budget",
    "confidence_scores",
    "default_thresholds",
    "macs_at_accuracy",
    "maxprob_threshold",
    "per_exit_accuracy",
    "reduction_factor",
    "resolve_budget",
    "simulate",
    "sweep",
]
