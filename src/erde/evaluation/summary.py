"""The numbers a report states about one run, from its logits cache.

Thresholds are always chosen on the validation curve and then applied once to the test split; the
test curve is only described (per-exit accuracy, AUC), never searched (docs/method.md,
"Evaluation protocol").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from erde.errors import ErdeError
from erde.evaluation.cache import SPLITS, LogitsCache
from erde.evaluation.calibrate import (
    apply_scores,
    calibrate_for_accuracy,
    calibrate_for_budget,
    resolve_budget,
)
from erde.evaluation.diagnostics import ReferenceLogits, diagnose_scores
from erde.evaluation.metrics import auc, per_exit_accuracy
from erde.evaluation.policy import confidence_scores
from erde.evaluation.scores import ExitScores, ScoreFunction
from erde.evaluation.sweep import Curve, sweep_scores
from erde.run.model_info import ModelInfo
from erde.run.report import (
    OWN_REFERENCE,
    OperatingPoint,
    Reference,
    Report,
    budget_label,
    keep_label,
)


@dataclass
class RunSummary:
    """A run's report, the two curves it was drawn from (for the CSV files and the plots) and
    its resolved config (what `erde compare` groups runs by)."""

    report: Report
    val_curve: Curve
    test_curve: Curve
    config: dict[str, Any] = field(default_factory=dict)


def reference_from_cache(cache: LogitsCache, label: str, static_macs: float) -> Reference:
    """A run's final exit as the reference; `static_macs`: its cost as a plain network."""
    return Reference(
        label,
        float(per_exit_accuracy(cache.logits["val"], cache.labels["val"])[-1]),
        float(per_exit_accuracy(cache.logits["test"], cache.labels["test"])[-1]),
        float(static_macs),
    )


def check_max_drop(max_drop: float) -> None:
    """Refused before any work: a negative drop would ask for more than the reference, an
    infinite one for no accuracy at all."""
    if not 0 <= max_drop < float("inf"):
        raise ErdeError(f"--max-drop {max_drop} must be a finite number >= 0 of accuracy points")


def chosen_rule(reference_label: str, max_drop: float, budget: float | None) -> str:
    """The rule that chooses the deployed point: the user's budget, else keeping the reference's
    val accuracy (what `Report.chosen_by` records, known before any logits are computed)."""
    return keep_label(reference_label, max_drop) if budget is None else budget_label(budget)


def _budget_points(
    point: Callable[[float], OperatingPoint], budgets: Sequence[float]
) -> dict[str, OperatingPoint | None]:
    """The default budgets' points; None for a budget outside what the model can spend."""
    points: dict[str, OperatingPoint | None] = {}
    for fraction in budgets:
        try:
            points[f"{fraction:g}"] = point(fraction)
        except ErdeError:
            points[f"{fraction:g}"] = None  # below the first exit: no such operating point
    return points


@dataclass(frozen=True)
class _Points:
    """Operating points: chosen on the val curve, then applied to the once-scored test split."""

    test: ExitScores
    val_curve: Curve
    exit_macs: Sequence[float]
    reference_macs: float
    max_drop: float

    def keep(self, accuracy: float) -> OperatingPoint:
        """The cheapest val point within `max_drop` accuracy points of `accuracy`."""
        calibration = calibrate_for_accuracy(self.val_curve, accuracy - self.max_drop / 100.0)
        return apply_scores(self.test, self.exit_macs, calibration, self.reference_macs)

    def within(self, fraction: float) -> OperatingPoint:
        """The most accurate val point within a budget (a fraction of the full model, or MACs)."""
        budget = resolve_budget(fraction, float(self.exit_macs[-1]))
        calibration = calibrate_for_budget(self.val_curve, budget)
        return apply_scores(self.test, self.exit_macs, calibration, self.reference_macs)


def summarize(
    cache: LogitsCache,
    info: ModelInfo,
    run: str,
    *,
    policy: str = "entropy",
    normalize: bool = False,
    reference: Reference | None = None,
    max_drop: float = 0.0,
    budgets: Sequence[float] = (0.25, 0.5),
    budget: float | None = None,
    teacher: ReferenceLogits | None = None,
    score: ScoreFunction = confidence_scores,
) -> RunSummary:
    """Per-exit accuracy, AUC, the val-calibrated operating points and what they give on test,
    and the diagnostics at the chosen point.

    `max_drop` is in accuracy points below the reference; `budgets` are default operating points
    (skipped when outside the model's range); `budget` is the user's own one and must fit;
    `teacher`, the reference run's test outputs, splits images into teacher-right and -wrong.
    Each split is scored once, with `score`, and every number reads those scores.
    """
    check_max_drop(max_drop)
    macs = cache.exit_macs
    full = float(macs[-1])
    split = {
        s: ExitScores.of(cache.logits[s], cache.labels[s], policy, normalize, score) for s in SPLITS
    }
    curves = {s: sweep_scores(split[s], macs) for s in SPLITS}
    per_exit = {s: split[s].correct.double().mean(dim=0).tolist() for s in SPLITS}
    if reference is None:
        reference = Reference(OWN_REFERENCE, per_exit["val"][-1], per_exit["test"][-1], full)
    points = _Points(split["test"], curves["val"], macs, reference.macs, max_drop)
    at_reference = points.keep(reference.val_accuracy)
    chosen = at_reference if budget is None else points.within(budget)
    report = Report(
        run=run,
        model=info.name,
        method=info.method,
        seed=info.seed,
        policy=policy,
        normalize=normalize,
        exit_macs=list(macs),
        per_exit_accuracy=per_exit,
        test_auc=auc(curves["test"], full),
        reference=reference,
        max_drop_points=max_drop,
        at_reference_accuracy=at_reference,
        at_own_full_accuracy=points.keep(per_exit["val"][-1]),
        at_budget_fraction=_budget_points(points.within, budgets),
        chosen=chosen,
        chosen_by=chosen_rule(reference.label, max_drop, budget),
        weights_sha256=cache.weights_sha256 or None,
        diagnostics=diagnose_scores(
            split["test"], threshold=chosen.threshold, pairing=info.pairing, teacher=teacher
        ),
    )
    return RunSummary(report, curves["val"], curves["test"], grouping_config(info))


def grouping_config(info: ModelInfo) -> dict[str, Any]:
    """The run's config with `train.precision` as the run resolved it, so that `auto` that
    became bf16 and an explicit bf16 are one setting when runs are grouped."""
    if info.precision is None or "train" not in info.config:
        return info.config
    return {**info.config, "train": {**info.config["train"], "precision": info.precision}}
