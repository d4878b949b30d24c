"""`erde evaluate` and `erde compare`: run folders in, report files out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from erde.config.methods import load_method_module
from erde.errors import ErdeError
from erde.evaluation.cache import load_cache
from erde.evaluation.calibrate import check_budget, resolve_budget
from erde.evaluation.compare import Comparison, aggregate
from erde.evaluation.diagnostics import ReferenceLogits
from erde.evaluation.policies import get_policy
from erde.evaluation.render import render_comparison, render_report
from erde.evaluation.summary import (
    RunSummary,
    check_max_drop,
    chosen_rule,
    reference_from_cache,
    summarize,
)
from erde.evaluation.sweep import write_curve_csv
from erde.files import write_json, write_text
from erde.run import checkpoint as ckpt
from erde.run.layout import ComparisonDir, ReportDir, RunDir
from erde.run.lock import writer_lock
from erde.run.report import OWN_REFERENCE, Reference, Report, criterion_text, read_report

log = logging.getLogger("erde.evaluate")


def reference_label(run_dir: str | Path) -> str:
    """How reports name a reference run: its method and model, final exit."""
    info = ckpt.read_info(run_dir)
    return f"{info.method} {info.name} (final exit)"


def run_reference(
    run_dir: str | Path, *, refresh: bool = False, device: str = "auto"
) -> tuple[Reference, ReferenceLogits]:
    """A finished run (normally the teacher) as the accuracy to keep and the MACs to beat, and
    its test outputs, which tell the diagnostics the images it gets right and wrong.

    Its MACs are those of the plain network (no intermediate heads): the honest cost of deploying
    the reference without early exits.
    """
    cache = load_cache(run_dir, refresh=refresh, device=device)
    info = ckpt.read_info(run_dir)
    teacher = ReferenceLogits(
        f"{info.method} {info.name} ({Path(run_dir)})", cache.logits["test"], cache.labels["test"]
    )
    return reference_from_cache(cache, reference_label(run_dir), info.static_macs), teacher


def _summarize_run(
    run_dir: str | Path,
    reference: tuple[Reference, ReferenceLogits] | None,
    refresh: bool,
    device: str,
    **options,
) -> RunSummary:
    """One run's cache (built on first use) summarised; `options` go to `summarize`. A plugin
    method's module is imported first (when trusted): its keys' records say how runs group."""
    info = ckpt.read_info(run_dir)
    module = info.config.get("distill", {}).get("module")
    load_method_module(module, str(RunDir(run_dir).sidecar))
    cache = load_cache(run_dir, refresh=refresh, device=device)
    ref, teacher = reference if reference is not None else (None, None)
    return summarize(cache, info, str(Path(run_dir)), reference=ref, teacher=teacher, **options)


def write_evaluation(out: ReportDir, summary: RunSummary) -> None:
    """Every file of `erde evaluate`: report.json/.md, both curves as CSV, and the plots."""
    summary.report.write(out.report_json)
    write_curve_csv(out.curve_csv, summary.test_curve)
    write_curve_csv(out.curve_val_csv, summary.val_curve)
    from erde.evaluation.plots import plot_run  # matplotlib: not for commands that only train

    plot_run(out, summary)
    write_text(out.report_md, render_report(summary.report))


def _same_folder(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def evaluation_dir(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    policy: str = "entropy",
    normalize: bool = False,
    max_drop: float = 0.0,
    budget: float | None = None,
    replace_export: bool = False,
) -> ReportDir:
    """Where an evaluation goes: `out` when given; else `RUN/eval/`, whose threshold `erde export`
    deploys, for the default criterion or with `replace_export`; else `RUN/eval-CRITERION/`."""
    export = RunDir(run_dir).eval
    if out is not None:
        if replace_export and not _same_folder(Path(out), export.path):
            raise ErdeError(
                f"--replace-export writes {export.path}, the evaluation `erde export` deploys, "
                f"not --out {out}; drop one of the two"
            )
        return ReportDir(out)
    if replace_export:
        return export
    return RunDir(run_dir).eval_for(
        policy=policy, normalize=normalize, max_drop=max_drop, budget=budget
    )


def _held_criterion(run_dir: str | Path, out: ReportDir) -> str | None:
    """The criterion of the evaluation in `out`, when `out` is one of the run's own evaluation
    folders (`eval/`, `eval-CRITERION/`) holding a readable report (a damaged one holds no
    result, so nothing is lost replacing it)."""
    if not out.report_json.is_file() or not _is_eval_folder(run_dir, out.path):
        return None
    try:
        return read_report(out.report_json).criterion
    except ErdeError:
        return None


def _is_eval_folder(run_dir: str | Path, folder: Path) -> bool:
    """`folder` is the run's `eval/` or an `eval-CRITERION/` (however the path is spelled)."""
    name = folder.resolve().name
    in_run = _same_folder(folder.resolve().parent, Path(run_dir))
    return in_run and (name == "eval" or name.startswith("eval-"))


def _check_criterion_kept(
    run_dir: str | Path, out: ReportDir, criterion: str, replace_export: bool
) -> None:
    """An evaluation never silently replaces one chosen by another criterion in the run's
    evaluation folders: `eval/` (the threshold `erde export` deploys) takes `replace_export`,
    an `eval-CRITERION/` (its name leaves out the reference) `--out` or deleting it; the same
    criterion may rewrite either."""
    held = _held_criterion(run_dir, out)
    if held is None or held == criterion:
        return
    if not _same_folder(out.path, RunDir(run_dir).eval.path):
        raise ErdeError(
            f"{out.path} holds an evaluation chosen by {held}; this evaluation chooses by "
            f"{criterion}. Pass --out DIR to write it elsewhere, or delete {out.path} to "
            "replace it"
        )
    if replace_export:
        return
    raise ErdeError(
        f"{out.path} holds the threshold `erde export` deploys, chosen by {held}; this "
        f"evaluation chooses by {criterion}. Pass --replace-export to deploy this one instead, "
        "or --out DIR to write it elsewhere"
    )


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
    replace_export: bool = False,
) -> Report:
    """Cache logits, sweep thresholds, calibrate on val, report on test, into `evaluation_dir`;
    one writer at a time: not while `erde train` or another evaluation writes the folder.

    `RUN/eval/` holds the threshold `erde export` deploys: an evaluation with another criterion
    (rule, reference, policy) replaces it only with `replace_export`, and is refused, before any
    work, without it; an `eval-CRITERION/` holding another reference's is refused likewise
    (`_check_criterion_kept`)."""
    if not Path(run_dir).is_dir():
        ckpt.load_weights(run_dir)  # the message for a missing folder, before any lock file
    with writer_lock(run_dir):
        macs = ckpt.load_weights(run_dir)[1].exit_macs  # the run's weights are readable, first
        # Every mistake is reported before the model runs to fill a cache.
        get_policy(policy)
        check_max_drop(max_drop)
        if budget is not None:
            check_budget(resolve_budget(budget, macs[-1]), (macs[0], macs[-1]))
        target = evaluation_dir(
            run_dir,
            out,
            policy=policy,
            normalize=normalize,
            max_drop=max_drop,
            budget=budget,
            replace_export=replace_export,
        )
        label = reference_label(reference) if reference else OWN_REFERENCE
        rule = chosen_rule(label, max_drop, budget)
        criterion = criterion_text(rule, policy, normalize)
        _check_criterion_kept(run_dir, target, criterion, replace_export)
        # --refresh recomputes every cache the report reads: the reference's too.
        ref = run_reference(reference, refresh=refresh, device=device) if reference else None
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
        write_evaluation(target, summary)
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
    named: Sequence[str] = (),
) -> Comparison:
    """Runs grouped by method, model and the config keys that differ (seeds averaged, mean ±
    std) on one table and one plot; two runs of one seed in a group are refused.

    The runs in `evaluate_each` also get their own report in RUN/eval (`reproduce` passes the
    runs it trained), so each can go to `erde export` as it is; one whose RUN/eval holds a
    threshold chosen by another criterion keeps it, with a warning (`_write_study_evaluation`).
    `named`: keys every group label names, differing or not (`aggregate`)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ErdeError(f"--out {out} is a file; give a folder path for the comparison")
    if not run_dirs:
        raise ErdeError("give at least one run folder to compare")
    get_policy(policy)
    ref = run_reference(reference, device=device) if reference else None
    options = {"policy": policy, "normalize": normalize, "max_drop": max_drop, "budgets": budgets}
    summaries = [_summarize_run(run, ref, False, device, **options) for run in run_dirs]
    own = {Path(r) for r in evaluate_each}
    for run, summary in zip(run_dirs, summaries, strict=True):
        if Path(run) in own:
            with writer_lock(run):
                _write_study_evaluation(run, summary)
    comparison = aggregate(summaries, max_drop, named)
    files = ComparisonDir(out)
    from erde.evaluation.plots import plot_comparison

    plot_comparison(files.comparison_png, comparison)
    write_text(files.comparison_md, render_comparison(comparison))
    write_json(files.comparison_json, comparison.to_json())
    return comparison


def _write_study_evaluation(run: str | Path, summary: RunSummary) -> None:
    """A study's evaluation of one of its runs into RUN/eval, unless that holds the export
    threshold of another criterion: a study never fails at its end for that, it says so."""
    export = RunDir(run).eval
    held = _held_criterion(run, export)
    if held is not None and held != summary.report.criterion:
        log.warning(
            "%s kept: it holds the threshold `erde export` deploys, chosen by %s, and this study "
            "chooses by %s; to deploy the study's, run `erde evaluate %s` with its criterion and "
            "--replace-export",
            export.path,
            held,
            summary.report.criterion,
            run,
        )
        return
    write_evaluation(export, summary)
