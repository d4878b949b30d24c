"""Evaluation on cached per-exit logits: exit policies, threshold sweeps, metrics, calibration.

The names below are imported on first use (PEP 562), so that the ONNX runtime can import
`erde.evaluation.rule` (the exit rule's names and thresholds, numpy only) without PyTorch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# name -> module that defines it
_LAZY = {
    "POLICIES": "erde.evaluation.rule",
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
    "resolve_budget": "erde.evaluation.calibrate",
    "simulate": "erde.evaluation.policy",
    "sweep": "erde.evaluation.sweep",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'erde.evaluation' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = list(_LAZY)
