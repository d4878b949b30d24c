"""Markdown of `erde evaluate` (`report.md`) and `erde compare` (`comparison.md`).

Numbers come from a `Report` or a `Comparison`; nothing here computes a metric, it only formats,
one way everywhere: accuracy in % with 2 decimals, MACs per image in millions ("12.30 M"), MACs
reductions as "3.30x", seeds as mean ± sample std (docs/method.md, "Evaluation protocol"). Every
table has a legend of its columns under it, and every "n/a" says why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from erde.evaluation.compare import Comparison
from erde.evaluation.frontier import render_frontier
from erde.run.report import (
    OWN_REFERENCE,
    Diagnostics,
    ExitDiagnostics,
    OperatingPoint,
    Report,
    budget_label,
    keep_label,
    markdown_table,
)

NO_REFERENCE = "no reference run (--reference)"
KEEP_REFERENCE = "keep reference val accuracy: MACs reduction at test accuracy"
KEEP_OWN = "keep own val accuracy: MACs reduction at test accuracy"
BELOW_FIRST_EXIT = "budget below the first exit's cost"
AUC_HEAD = "test AUC, own MACs range (%)"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _macs(macs: float) -> str:
    """MACs per image as every report writes them: millions, 2 decimals."""
    return f"{macs / 1e6:.2f} M"


def _times(x: float) -> str:
    return f"{x:.2f}x"


def _mean_std(
    values: Sequence[float | None], *, missing: str, digits: int = 2, unit: str = ""
) -> str:
    """Mean ± sample std of the seeds that have the value, then `unit`; "n/a: `missing`" when
    none has it, and how many have it when only some do."""
    vals = [v for v in values if v is not None]
    if not vals:
        return f"n/a: {missing}"
    if len(vals) == 1:
        text = f"{vals[0]:.{digits}f}{unit}"
    else:
        text = f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}{unit}"
    if len(vals) < len(values):
        text += f" ({len(vals)} of {len(values)} seeds; the others n/a: {missing})"
    return text


# Why a diagnostic is undefined, for a report and an exit (0-based index into its lists).
Reason = Callable[[Report, int], str]


def _auroc_reason(r: Report, i: int) -> str:
    accuracy = r.per_exit_accuracy["test"][i]
    if accuracy == 1:
        return "the exit is right on every test image"
    if accuracy == 0:
        return "the exit is wrong on every test image"
    return "no test image"


def _teacher_reason(when_reference: str) -> Reason:
    """Without a reference run, that; with one, `when_reference` (an empty group of images)."""

    def reason(r: Report, i: int) -> str:
        d = r.diagnostics
        return NO_REFERENCE if d is None or d.teacher_wrong_share is None else when_reference

    return reason


TEACHER_ALWAYS_WRONG: Reason = _teacher_reason("the reference is wrong on every test image")
TEACHER_ALWAYS_RIGHT: Reason = _teacher_reason("the reference is right on every test image")


def _exit_value(
    r: Report, i: int, value: Callable[[ExitDiagnostics], float | None], scale: float
) -> float | None:
    v = None if r.diagnostics is None else value(r.diagnostics.per_exit[i])
    return None if v is None else scale * v


def _why(r: Report, i: int, reason: Reason | None) -> str:
    """Why exit `i` of `r` has no value; `reason` None: only a report without diagnostics."""
    if r.diagnostics is None or reason is None:
        return "no diagnostics in this report"
    return reason(r, i)


def _per_exit(
    reports: list[Report],
    value: Callable[[ExitDiagnostics], float | None],
    reason: Reason | None,
    *,
    scale: float = 1.0,
    digits: int = 2,
) -> str:
    """`value(exit diagnostics)` per exit as mean ± std over the seeds, exits joined by " / ";
    one "n/a: why" when it is undefined at every exit for one reason."""
    cells = []
    for i in range(len(reports[0].exit_macs)):
        values = [_exit_value(r, i, value, scale) for r in reports]
        why = next(
            (_why(r, i, reason) for r, v in zip(reports, values, strict=True) if v is None), ""
        )
        cells.append(_mean_std(values, missing=why, digits=digits))
    if len(set(cells)) == 1 and cells[0].startswith("n/a"):
        return cells[0]
    return " / ".join(cells)


def _reference_text(r: Report | Comparison, whose: str) -> str:
    ref = r.reference
    if ref.label == OWN_REFERENCE:
        return f"Reference: {whose} own final exit (no reference run given)."
    return (
        f"Reference: {ref.label}: val accuracy {_pct(ref.val_accuracy)} %, test accuracy "
        f"{_pct(ref.test_accuracy)} %, {_macs(ref.macs)} MACs per image."
    )


def _exit_rows(r: Report) -> list[list[str]]:
    full = r.exit_macs[-1]
    return [
        [
            str(i + 1),
            _macs(m),
            f"{100 * m / full:.1f}",
            _pct(r.per_exit_accuracy["val"][i]),
            _pct(r.per_exit_accuracy["test"][i]),
        ]
        for i, m in enumerate(r.exit_macs)
    ]


def _operating_points(r: Report) -> list[tuple[str, OperatingPoint]]:
    """The report's operating points, each rule once, the chosen one among them: the reference's
    accuracy, the run's own (when the reference is another run), every budget that has a point,
    and the user's own budget when it is not one of those."""
    points = [(keep_label(r.reference.label, r.max_drop_points), r.at_reference_accuracy)]
    if r.reference.label != OWN_REFERENCE:
        points.append((keep_label(OWN_REFERENCE, r.max_drop_points), r.at_own_full_accuracy))
    points += [
        (budget_label(float(k)), p) for k, p in r.at_budget_fraction.items() if p is not None
    ]
    if r.chosen_by not in [label for label, _ in points]:
        points.append((r.chosen_by, r.chosen))
    return points


def _point_rows(r: Report) -> list[list[str]]:
    rows = []
    for label, p in _operating_points(r):
        threshold = f"{p.threshold:.4g}"
        if not p.reached:
            threshold += " (not reached on val: full model)"
        rows.append(
            [
                f"{label} (chosen)" if label == r.chosen_by else label,
                threshold,
                _pct(p.val_accuracy),
                _pct(p.test_accuracy),
                _macs(p.test_expected_macs),
                _times(p.reduction_vs_reference),
            ]
        )
    return rows


def _points_legend(r: Report) -> list[str]:
    full, first = r.exit_macs[-1], r.exit_macs[0]
    lines = [
        "- *criterion*: the rule that chose the threshold on the validation split: the fewest "
        "val MACs that keep a val accuracy (minus the allowed drop), or the highest val accuracy "
        "within a MACs budget (a share of this model's full MACs). *(chosen)* marks this "
        "evaluation's point: the one `exits.png` and the diagnostics use, and the one `erde "
        "export` deploys when this report is the run's `eval/`.",
        f"- *threshold*: an image leaves at the first exit whose {r.policy} score is below it "
        "(0: every image runs the full model). *not reached on val*: no threshold kept the "
        "accuracy, not even the full model, which stands in.",
        "- *val / test accuracy (%)*: the early-exit model's accuracy at that threshold; *test "
        "MACs per image*: expected over the test images.",
        f"- *MACs reduction vs reference*: the reference's {_macs(r.reference.macs)} per "
        "image / test MACs per image.",
    ]
    missing = [budget_label(float(k)) for k, p in r.at_budget_fraction.items() if p is None]
    if missing:
        lines.append(
            f"- No point for {', '.join(missing)}: {BELOW_FIRST_EXIT} ({_macs(first)} per "
            f"image, {100 * first / full:.1f}% of full)."
        )
    return lines


def _diagnostic_rows(r: Report, d: Diagnostics) -> list[list[str]]:
    """One row per exit; the teacher columns only when a reference run was given."""

    def cell(i: int, v: float | None, reason: Reason, digits: int, scale: float = 1.0) -> str:
        return _mean_std([None if v is None else scale * v], missing=reason(r, i), digits=digits)

    with_teacher = d.teacher_wrong_share is not None
    rows = []
    for i, x in enumerate(d.per_exit):
        row = [
            str(i + 1),
            _pct(r.per_exit_accuracy["test"][i]),
            _pct(x.ece),
            cell(i, x.auroc, _auroc_reason, 3),
        ]
        if with_teacher:
            row += [
                "n/a" if x.teacher_exit is None else str(x.teacher_exit),
                cell(i, x.mean_score_teacher_right, TEACHER_ALWAYS_WRONG, 3),
                cell(i, x.mean_score_teacher_wrong, TEACHER_ALWAYS_RIGHT, 3),
            ]
        row.append(_pct(r.chosen.test_exit_share[i]))
        if with_teacher:
            row.append(cell(i, x.teacher_wrong_exit_share, TEACHER_ALWAYS_RIGHT, 2, scale=100))
        rows.append(row)
    return rows


def render_diagnostics(r: Report) -> list[str]:
    """The "Diagnostics" section of `report.md` (empty for a report without diagnostics)."""
    d = r.diagnostics
    if d is None:
        return []
    with_teacher = d.teacher_wrong_share is not None
    teacher_heads = ["teacher exit", "mean score, teacher right", "mean score, teacher wrong"]
    wrong_images = "" if d.teacher_wrong_images is None else f" of {d.teacher_wrong_images}"
    headers = [
        "exit",
        "test accuracy (%)",
        f"ECE (%, {d.ece_bins} bins)",
        "AUROC of exit score",
        *(teacher_heads if with_teacher else []),
        "images leaving here at the chosen threshold (%)",
        *([f"teacher-wrong images leaving here (%{wrong_images})"] if with_teacher else []),
    ]
    wrong = (
        "none leaves early"
        if d.early_exit_error is None
        else f"{_pct(d.early_exit_error)} % of those are wrong"
    )
    return [
        "## Diagnostics (test split)",
        "",
        markdown_table(headers, _diagnostic_rows(r, d)),
        "",
        f"Exit score: {r.policy}{' (normalised)' if r.normalize else ''}, lower = more "
        "confident. AUROC: how well the score tells the exit's right answers from its wrong "
        "ones (0.5 = chance). "
        + (
            "No teacher columns: no reference run given (--reference TEACHER)."
            if d.teacher_wrong_share is None
            else f"Teacher: {d.teacher_note}. Teacher-wrong images: those the reference's final "
            f"exit gets wrong ({_pct(d.teacher_wrong_share)} % of the test split"
            + ("" if d.teacher_wrong_images is None else f", {d.teacher_wrong_images} images")
            + ")."
        ),
        "",
        f"At the chosen threshold {r.chosen.threshold:.4g}: {_pct(d.early_exit_share)} % of test "
        f"images leave before the last exit; {wrong}.",
        "",
        "![diagnostics](diagnostics.png)",
        "",
    ]


def render_report(r: Report) -> str:
    """`report.md`: per-exit accuracy, AUC, reference, the operating points and diagnostics."""
    exit_heads = [
        "exit",
        "cumulative MACs per image",
        "share of full MACs (%)",
        "val accuracy (%)",
        "test accuracy (%)",
    ]
    point_heads = [
        "criterion",
        "threshold",
        "val accuracy (%)",
        "test accuracy (%)",
        "test MACs per image",
        "MACs reduction vs reference",
    ]
    return "\n".join(
        [
            f"# {r.model} — {r.method} (seed {r.seed})",
            "",
            f"Run: `{r.run}`. Policy: {r.policy}{' (normalised)' if r.normalize else ''}. "
            "Thresholds are chosen on the validation split and reported on the test split.",
            "",
            "## Per exit",
            "",
            markdown_table(exit_heads, _exit_rows(r)),
            "",
            "Each exit on its own: every image leaves there. Test AUC (mean test accuracy over the "
            f"accuracy-vs-MACs curve, MACs normalised to the full model): {_pct(r.test_auc)} %. "
            + _reference_text(r, "the run's"),
            "",
            "## Operating points",
            "",
            markdown_table(point_heads, _point_rows(r)),
            "",
            *_points_legend(r),
            "",
            "![accuracy vs MACs](tradeoff.png)",
            "",
            "![exit distribution](exits.png)",
            "",
            *render_diagnostics(r),
        ]
    )


def _keep_cell(points: list[OperatingPoint], reduction: str) -> str:
    """MACs reduction and test accuracy over the seeds, as "A x at B %", or on how many seeds
    the accuracy target was not reached (then there is no such point)."""
    missed = sum(not p.reached for p in points)
    if missed:
        return f"n/a: not reached on val ({missed} of {len(points)} seeds)"
    times = _mean_std([getattr(p, reduction) for p in points], missing="", unit="x")
    accuracy = _mean_std([100 * p.test_accuracy for p in points], missing="", unit=" %")
    return f"{times} at {accuracy}"


def _budget_accuracy(r: Report, fraction: str) -> float | None:
    p = r.at_budget_fraction.get(fraction)
    return None if p is None else 100 * p.test_accuracy


def _group_row(label: str, reports: list[Report], budgets: list[str], own: bool) -> list[str]:
    """One table row: a group's runs (one per seed) as mean ± std."""
    per_exit = [
        _mean_std([100 * r.per_exit_accuracy["test"][i] for r in reports], missing="")
        for i in range(len(reports[0].exit_macs))
    ]
    keep = (
        []
        if own
        else [_keep_cell([r.at_reference_accuracy for r in reports], "reduction_vs_reference")]
    )
    accuracy = [
        _mean_std([_budget_accuracy(r, k) for r in reports], missing=BELOW_FIRST_EXIT)
        for k in budgets
    ]
    return [
        label,
        str(len(reports)),
        " / ".join(per_exit),
        _mean_std([100 * r.test_auc for r in reports], missing=""),
        *keep,
        _keep_cell([r.at_own_full_accuracy for r in reports], "reduction_vs_own_full"),
        *accuracy,
    ]


def _budget_head(fraction: str) -> str:
    return f"{budget_label(float(fraction))}: test accuracy (%)"


def _comparison_legend(
    c: Comparison, n_exits: int, budgets: list[str], dropped: list[str], own: bool
) -> list[str]:
    drop = f"{c.max_drop_points:g} pt"
    named = f"the keys {', '.join(c.named)} where a run has them, and " if c.named else "and "
    lines = [
        f"- **group**: method (model), {named}the config keys that differ among the compared "
        "runs (teachers and students each among their own kind).",
        "- **seeds**: the runs the row holds, one per seed; with more than one, every number is "
        "mean ± sample std over them.",
        "- **test accuracy per exit (%)**: each exit on its own (every image leaves there), "
        f"exits 1 to {n_exits} separated by /.",
        f"- **{AUC_HEAD}**: mean test accuracy over the accuracy-vs-MACs curve of all "
        "thresholds, MACs normalised to the run's own full model; so it compares rows of one "
        "architecture (students with students), not a teacher with a smaller student.",
    ]
    if not own:
        lines.append(
            f"- **{KEEP_REFERENCE}**: at the threshold with the fewest val MACs whose val "
            f"accuracy is at least the reference's ({_pct(c.reference.val_accuracy)} %) - {drop}, "
            f"\"A x at B %\": A = the reference's {_macs(c.reference.macs)} / the run's test "
            "MACs per image there, B = its test accuracy there. *not reached on val (k of n "
            "seeds)*: on k seeds no threshold kept that accuracy, not even the full model, so "
            "there is no such point."
        )
    lines.append(
        f"- **{KEEP_OWN}**: the same with the run's own final-exit val accuracy "
        f"- {drop} as the target, and A = the run's own full MACs / its test MACs per image."
    )
    if budgets:
        names = " and ".join(f"**{_budget_head(k)}**" for k in budgets)
        lines.append(
            f"- {names}: at the threshold with the highest val accuracy whose val MACs per image "
            "are at most that share of the run's full model; n/a where that is below the first "
            "exit's cost."
        )
    if dropped:
        lines.append(
            f"- Left out: {', '.join(dropped)}, below the first exit's cost in every run (no "
            "point)."
        )
    return lines


def _diagnostics_row(label: str, reports: list[Report], with_teacher: bool) -> list[str]:
    """One row of the comparison's diagnostics table: a group's seeds as mean ± std."""
    early = [None if r.diagnostics is None else r.diagnostics.early_exit_error for r in reports]
    row = [
        label,
        _per_exit(reports, lambda x: x.ece, None, scale=100),
        _per_exit(reports, lambda x: x.auroc, _auroc_reason, digits=3),
    ]
    if with_teacher:
        row += [
            _per_exit(
                reports, lambda x: x.mean_score_teacher_right, TEACHER_ALWAYS_WRONG, digits=3
            ),
            _per_exit(
                reports, lambda x: x.mean_score_teacher_wrong, TEACHER_ALWAYS_RIGHT, digits=3
            ),
        ]
    row.append(
        _mean_std([None if e is None else 100 * e for e in early], missing="none leaves early")
    )
    if with_teacher:
        row.append(
            _per_exit(
                reports, lambda x: x.teacher_wrong_exit_share, TEACHER_ALWAYS_RIGHT, scale=100
            )
        )
    return row


def render_comparison_diagnostics(groups: dict[str, list[Report]]) -> list[str]:
    """The comparison's second table: the mechanism diagnostics per group (README, "Evaluation");
    the teacher columns only when some run was evaluated against a reference."""
    first = next(iter(groups.values()))[0]
    bins = "" if first.diagnostics is None else f", {first.diagnostics.ece_bins} equal-width bins"
    with_teacher = any(
        r.diagnostics is not None and r.diagnostics.teacher_wrong_share is not None
        for reports in groups.values()
        for r in reports
    )
    teacher_heads = [
        "mean exit score per exit, teacher right",
        "mean exit score per exit, teacher wrong",
    ]
    headers = [
        "group",
        "ECE per exit (%)",
        "AUROC of exit score per exit",
        *(teacher_heads if with_teacher else []),
        "early exits that are wrong (%)",
        *(["teacher-wrong images leaving per exit (%)"] if with_teacher else []),
    ]
    rows = [_diagnostics_row(label, reports, with_teacher) for label, reports in groups.items()]
    teacher_legend = [
        "- **mean exit score per exit, teacher right / wrong**: on the test images the reference "
        "gets right / wrong, each exit judged by the reference exit it was paired with in "
        "training (the final exit for runs without a pairing).",
    ]
    wrong_legend = [
        "- **teacher-wrong images leaving per exit (%)**: at each run's chosen threshold, where "
        "the images the reference's final exit gets wrong leave.",
    ]
    return [
        "## Diagnostics (test split)",
        "",
        markdown_table(headers, rows),
        "",
        "Per exit, separated by /; mean ± std over the seeds."
        + (
            ""
            if with_teacher
            else " No teacher columns: no run was evaluated against a "
            "reference run (--reference TEACHER)."
        ),
        "",
        f"- **ECE per exit (%)**: expected calibration error of the max probability{bins}.",
        f"- **AUROC of exit score per exit**: how well the exit score ({first.policy}, lower = "
        "more confident) tells the exit's right answers from its wrong ones (0.5 = chance).",
        *(teacher_legend if with_teacher else []),
        "- **early exits that are wrong (%)**: at each run's chosen threshold, the share of the "
        "images leaving before the last exit that are wrong.",
        *(wrong_legend if with_teacher else []),
        "",
    ]


def _comparison_budgets(groups: dict[str, list[Report]]) -> tuple[list[str], list[str]]:
    """The budgets (fractions as text) some run has a point for, and those no run has."""
    keys = list(next(iter(groups.values()))[0].at_budget_fraction)
    reports = [r for runs in groups.values() for r in runs]
    kept = [k for k in keys if any(r.at_budget_fraction.get(k) is not None for r in reports)]
    return kept, [k for k in keys if k not in kept]


def render_comparison(c: Comparison) -> str:
    """`comparison.md`: one row per group, seeds as mean ± std, a legend, and the plot."""
    groups = {label: [s.report for s in runs] for label, runs in c.groups.items()}
    first = next(iter(groups.values()))[0]
    own = c.reference.label == OWN_REFERENCE  # then "keep reference" is "keep own"
    budgets, dropped = _comparison_budgets(groups)
    headers = [
        "group",
        "seeds",
        "test accuracy per exit (%)",
        AUC_HEAD,
        *([] if own else [KEEP_REFERENCE]),
        KEEP_OWN,
        *(_budget_head(k) for k in budgets),
    ]
    rows = [_group_row(label, reports, budgets, own) for label, reports in groups.items()]
    legend = _comparison_legend(
        c, len(first.exit_macs), budgets, [budget_label(float(k)) for k in dropped], own
    )
    return "\n".join(
        [
            "# Comparison",
            "",
            _reference_text(c, "each run's") + " Every threshold is chosen on the run's "
            "validation split and reported on its test split.",
            "",
            markdown_table(headers, rows),
            "",
            *legend,
            "",
            "![comparison](comparison.png)",
            "",
            *render_frontier(c),
            *render_comparison_diagnostics(groups),
        ]
    )
