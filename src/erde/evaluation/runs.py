"""`erde evaluate` and `erde compare`: run folders in, report files out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from erde import checkpoint as ckpt
from erde.errors import ErdeError
from erde.evaluation.cache import load_cache
from erde.evaluation.calibrate import check_budget, resolve_budget
from erde.evaluation.compare import Comparison, aggregate
from erde.evaluation.diagnostics import TeacherOutputs
from erde.evaluation.plots import plot_comparison, plot_run
from erde.evaluation.render import render_comparison, render_report
from erde.evaluation.summary import RunSummary, check_max_drop, reference_from_cache, summarize
from erde.evaluation.sweep import write_curve_csv
from erde.files import write_json, write_text
from erde.report import Reference, Report
from erde.run_lock import writer_lock
from erde.rundir import ComparisonDir, ReportDir, RunDir


def run_reference(
    run_dir: str | Path, *, refresh: bool = False, device: str = "auto"
) -> tuple[Reference, TeacherOutputs]:
    """A finished run (normally the teacher) as the accuracy to keep and the MACs to beat, and
    its test outputs, which tell the diagnostics the images it gets right and wrong.

    Its MACs are those of the plain network (no intermediate heads): the honest cost of deploying
    the reference without early exits.
    """
    cache = load_cache(run_dir, refresh=refresh, device=device)
    info = ckpt.read_info(run_dir)
    label = f"{info.method} {info.name} (final exit)"
    teacher = TeacherOutputs(
        f"{info.method} {info.name} ({Path(run_dir)})", cache.logits["test"], cache.labels["test"]
    )
    return reference_from_cache(cache, label, info.static_macs), teacher


def _summarize_run(
    run_dir: str | Path,
    reference: tuple[Reference, TeacherOutputs] | None,
    refresh: bool,
    device: str,
    **options,
) -> RunSummary:
    """One run's cache (built on first use) summarised; `options` go to `summarize`."""
    cache = load_cache(run_dir, refresh=refresh, device=device)
    info = ckpt.read_info(run_dir)
    ref, teacher = reference if reference is not None else (None, None)
    return summarize(cache, info, str(Path(run_dir)), reference=ref, teacher=teacher, **options)


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
    """Cache logits, sweep thresholds, calibrate on val, report on test; by default into
    `RunDir.eval_for` the criterion (RUN/eval only for the default one, which export reads);
    one writer at a time: not while `erde train` or another evaluation writes the folder."""
    if not Path(run_dir).is_dir():
        ckpt.load_weights(run_dir)  # the message for a missing folder, before any lock file
    with writer_lock(run_dir):
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
        if out is None:
            criterion = {"policy": policy, "normalize": normalize, "max_drop": max_drop}
            out = RunDir(run_dir).eval_for(**criterion, budget=budget).path
        write_evaluation(ReportDir(out), summary)
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
    evaluate_each: Sequence[str | Path] = (),
) -> Comparison:
    """Runs grouped by method, model and the config keys that differ (seeds averaged, mean ±
    std) on one table and one plot; two runs of one seed in a group are refused.

    The runs in `evaluate_each` also get their own report in RUN/eval (`reproduce` passes the
    runs it trained), so each can go to `erde export` as it is."""
    if not run_dirs:
        raise ErdeError("give at least one run folder to compare")
    ref = run_reference(reference, device=device) if reference else None
    options = {"policy": policy, "normalize": normalize, "max_drop": max_drop, "budgets": budgets}
    summaries = [_summarize_run(run, ref, False, device, **options) for run in run_dirs]
    own = {Path(r) for r in evaluate_each}
    for run, summary in zip(run_dirs, summaries, strict=True):
        if Path(run) in own:
            with writer_lock(run):
                write_evaluation(RunDir(run).eval, summary)
    comparison = aggregate(summaries, max_drop)
    files = ComparisonDir(out)
    plot_comparison(files.comparison_png, comparison)
    write_text(files.comparison_md, render_comparison(comparison))
    write_json(files.comparison_json, comparison.to_json())
    return comparison
