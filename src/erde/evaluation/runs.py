"""`erde evaluate` and `erde compare`: run folders in, report files out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from erde import checkpoint as ckpt
from erde.errors import ErdeError
from erde.evaluation.cache import load_cache
from erde.evaluation.calibrate import check_budget, resolve_budget
from erde.evaluation.compare import Comparison, aggregate
from erde.evaluation.plots import plot_comparison, plot_run
from erde.evaluation.render import render_comparison, render_report
from erde.evaluation.summary import RunSummary, check_max_drop, reference_from_cache, summarize
from erde.evaluation.sweep import write_curve_csv
from erde.files import write_json, write_text
from erde.report import Reference, Report
from erde.rundir import ComparisonDir, ReportDir, RunDir


def run_reference(run_dir: str | Path, *, refresh: bool = False, device: str = "auto") -> Reference:
    """A finished run (normally the teacher) as the accuracy to keep and the MACs to beat.

    Its MACs are those of the plain network (no intermediate heads): the honest cost of deploying
    the reference without early exits.
    """
    cache = load_cache(run_dir, refresh=refresh, device=device)
    info = ckpt.read_info(run_dir)
    label = f"{info.method} {info.name} (final exit)"
    return reference_from_cache(cache, label, info.static_macs)


def _summarize_run(
    run_dir: str | Path, reference: Reference | None, refresh: bool, device: str, **options
) -> RunSummary:
    """One run's cache (built on first use) summarised; `options` go to `summarize`."""
    cache = load_cache(run_dir, refresh=refresh, device=device)
    info = ckpt.read_info(run_dir)
    return summarize(cache, info, str(Path(run_dir)), reference=reference, **options)


def write_evaluation(out: ReportDir, summary: RunSummary) -> None:
    """Every file of `erde evaluate`: report.json/.md, both curves as CSV, and the plots."""
    summary.report.write(out.report_json)
    write_curve_csv(out.curve_csv, summary.test_curve)
    write_curve_csv(out.curve_val_csv, summary.val_curve)
    plot_run(out, summary)
    write_text(out.report_md, render_report(summary.report))


def evaluate_run(
    run_dir: str | Path,
    *,
    out: str | Path | None = None,
    reference: str | Path | None = None,
    policy: str = "entropy",
    normalize: bool = False,
    max_drop: float = 0.0,
    budget: float | None = None,
    budgets: Sequence[float] = (0.25, 0.5),
    refresh: bool = False,
    device: str = "auto",
) -> Report:
    """Cache logits, sweep thresholds, calibrate on val, report on test (default: RUN/eval)."""
    macs = ckpt.load_weights(run_dir)[1].exit_macs  # the run's weights are readable, first
    # Every mistake is reported before the model runs to fill a cache.
    check_max_drop(max_drop)
    if budget is not None:
        check_budget(resolve_budget(budget, macs[-1]), (macs[0], macs[-1]))
    ref = run_reference(reference, device=device) if reference else None
    summary = _summarize_run(
        run_dir,
        ref,
        refresh,
        device,
        policy=policy,
        normalize=normalize,
        max_drop=max_drop,
        budget=budget,
        budgets=budgets,
    )
    write_evaluation(ReportDir(out) if out is not None else RunDir(run_dir).eval, summary)
    return summary.report


def compare_runs(
    run_dirs: Sequence[str | Path],
    *,
    out: str | Path,
    reference: str | Path | None = None,
    policy: str = "entropy",
    normalize: bool = False,
    max_drop: float = 0.0,
    budgets: Sequence[float] = (0.25, 0.5),
    device: str = "auto",
) -> Comparison:
    """Runs grouped by method (seeds averaged, mean ± std) on one table and one plot."""
    if not run_dirs:
        raise ErdeError("give at least one run folder to compare")
    ref = run_reference(reference, device=device) if reference else None
    options = {"policy": policy, "normalize": normalize, "max_drop": max_drop, "budgets": budgets}
    summaries = [_summarize_run(run, ref, False, device, **options) for run in run_dirs]
    comparison = aggregate(summaries, max_drop)
    files = ComparisonDir(out)
    plot_comparison(files.comparison_png, comparison)
    write_text(files.comparison_md, render_comparison(comparison))
    write_json(files.comparison_json, comparison.to_json())
    return comparison
