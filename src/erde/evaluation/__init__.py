"""Evaluation on cached per-exit logits: exit policies, threshold sweeps, metrics, calibration.

The names below are imported on first use (PEP 562), so that the ONNX runtime can import
`erde.evaluation.rule` (the exit rule's names and thresholds, numpy only) without PyTorch.
"""

from __future__ import annotations

from erde import lazy_names

# name -> module that defines it
_LAZY = {
    "Calibration": "erde.evaluation.calibrate",
    "Curve": "erde.evaluation.sweep",
    "apply": "erde.evaluation.calibrate",
    "auc": "erde.evaluation.metrics",
    "calibrate_for_accuracy": "erde.evaluation.calibrate",
    "calibrate_for_budget": "erde.evaluation.calibrate",
    "confidence_scores": "erde.evaluation.policy",
    "default_thresholds": "erde.evaluation.sweep",
    "maxprob_threshold": "erde.evaluation.policy",
    "per_exit_accuracy": "erde.evaluation.metrics",
    "policy_names": "erde.evaluation.policies",
    "register_policy": "erde.evaluation.policies",
    "resolve_budget": "erde.evaluation.calibrate",
    "simulate": "erde.evaluation.policy",
    "sweep": "erde.evaluation.sweep",
}

__getattr__, __dir__ = lazy_names(__name__, _LAZY)

__all__ = list(_LAZY)
