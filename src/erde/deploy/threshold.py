"""Which threshold a deployment of a run uses: the one `erde evaluate` calibrated on val, unless
the user gives one."""

from __future__ import annotations

from pathlib import Path

from erde.deploy.curve import frontier
from erde.deploy.manifest import Deployment
from erde.errors import ErdeError
from erde.evaluation.cache import load_cache
from erde.evaluation.policies import get_policy
from erde.evaluation.policy import exit_thresholds
from erde.evaluation.scores import ExitScores
from erde.evaluation.sweep import sweep_scores
from erde.run.layout import RunDir
from erde.run.report import Report, read_current_report


def _report(run_dir: str | Path, weights_sha256: str | None) -> tuple[Report | None, Path]:
    return read_current_report(run_dir, weights_sha256), RunDir(run_dir).eval.report_json


def deployment(
    run_dir: str | Path,
    threshold: float | None = None,
    policy: str | None = None,
    normalize: bool | None = None,
    weights_sha256: str | None = None,
) -> Deployment:
    """Threshold, policy and normalize flag a deployment of `run_dir` uses, and where they came
    from: the val-calibrated "chosen" point of `erde evaluate` unless a threshold is given.

    A calibrated threshold only means something for the policy it was calibrated with, so asking
    for another policy without a threshold is refused; `weights_sha256` is the digest of the
    weights the caller loaded, which the calibration must have been computed from.
    """
    report, path = _report(run_dir, weights_sha256)
    if threshold is None:
        if report is None:
            raise ErdeError(
                f"{run_dir} has no calibrated threshold ({path} is missing); run "
                f"`erde evaluate {run_dir}` first, or give a threshold (--threshold; "
                "--thresholds for `erde bench`)"
            )
        if (policy is not None and policy != report.policy) or (
            normalize is not None and normalize != report.normalize
        ):
            raise ErdeError(
                f"the threshold in {path} was calibrated for policy {report.policy!r} "
                f"(normalize={report.normalize}); give a threshold for the policy you asked "
                f"for (--threshold), or re-run `erde evaluate {run_dir}` with that policy"
            )
        get_policy(report.policy)  # registered here, or the fix, before any work
        return Deployment(
            report.chosen.threshold,
            report.policy,
            report.normalize,
            f"calibrated on val ({report.chosen.criterion}), {path}",
        )
    if policy is None:
        policy = report.policy if report else "entropy"
    if normalize is None:
        normalize = report.normalize if report and report.policy == policy else False
    get_policy(policy)
    exit_thresholds(float(threshold), 2)  # the checks (non-negative, not NaN) and their message
    return Deployment(float(threshold), policy, bool(normalize), "given")


def has_calibration(run_dir: str | Path) -> bool:
    return RunDir(run_dir).eval.report_json.is_file()


def budget_thresholds(run_dir: str | Path, weights_sha256: str | None = None) -> dict[str, float]:
    """The val-calibrated MACs-budget thresholds of `erde evaluate` (fraction -> threshold), when
    it ran."""
    report, _ = _report(run_dir, weights_sha256)
    if report is None:
        return {}
    return {k: p.threshold for k, p in report.at_budget_fraction.items() if p is not None}


def val_curve(
    run_dir: str | Path, policy: str, normalize: bool, weights_sha256: str | None = None
) -> dict | None:
    """The val curve `erde evaluate` swept (its logits cache, scored with the deployment's
    policy), on its accuracy/MACs frontier (`erde.deploy.curve`); None when the run was never
    evaluated."""
    if read_current_report(run_dir, weights_sha256) is None:
        return None
    cache = load_cache(run_dir)
    scores = ExitScores.of(cache.logits["val"], cache.labels["val"], policy, normalize)
    return frontier(sweep_scores(scores, cache.exit_macs), len(cache.labels["val"]))
