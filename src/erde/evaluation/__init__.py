"""Evaluation on cached per-exit logits: exit policies, threshold sweeps, metrics, calibration."""

from erde.evaluation.calibrate import (
    Calibration,
    apply,
    calibrate_for_accuracy,
    calibrate_for_budget,
    resolve_budget,
)
from erde.evaluation.metrics import auc, per_exit_accuracy
from erde.evaluation.policy import POLICIES, confidence_scores, maxprob_threshold, simulate
from erde.evaluation.sweep import Curve, default_thresholds, sweep

__all__ = [
    "POLICIES",
    "Calibration",
    "Curve",
    "apply",
    "auc",
    "calibrate_for_accuracy",
    "calibrate_for_budget",
    "confidence_scores",
    "default_thresholds",
    "maxprob_threshold",
    "per_exit_accuracy",
    "resolve_budget",
    "simulate",
    "sweep",
]
