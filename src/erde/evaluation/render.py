"""Markdown of `erde evaluate` (`report.md`) and `erde compare` (`comparison.md`).

Numbers come from a `Report` or a `Comparison`; nothing here computes a metric, it only formats:
accuracy in %, MACs in millions, seeds as mean ± sample std (docs/method.md, "Evaluation
protocol").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from erde.evaluation.compare import Comparison
from erde.report import Diagnostics, ExitDiagnostics, OperatingPoint, Report, markdown_table


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _mean_std(values: list[float | None], digits: int = 2) -> str:
    """Mean ± sample std of the seeds that have the value (n/a when none has it)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"


def _point_row(name: str, p: OperatingPoint | None) -> list[str]:
    if p is None:
        return [name, "below the first exit's cost", "", "", "", ""]
    reduction = f"{p.reduction_vs_reference:.2f}x"
    if not p.reached:
        reduction += " (target not reached on val: full model)"
    return [
        name,
        f"{p.threshold:.4g}",
        _pct(p.val_accuracy),
        _pct(p.test_accuracy),
        f"{p.test_expected_macs / 1e6:.3f}",
        reduction,
    ]


def _exit_rows(r: Report) -> list[list]:
    macs = r.exit_macs
    return [
        [
            i + 1,
            f"{m / 1e6:.3f}",
            f"{100 * m / macs[-1]:.1f}",
            _pct(r.per_exit_accuracy["val"][i]),
            _pct(r.per_exit_accuracy["test"][i]),
        ]
        for i, m in enumerate(macs)
    ]


def _point_rows(r: Report) -> list[list[str]]:
    drop = f"{r.max_drop_points:g} pt"
    rows = [
        _point_row(f"keep {r.reference.label} val accuracy - {drop}", r.at_reference_accuracy),
        _point_row(f"keep the run's own final-exit val accuracy - {drop}", r.at_own_full_accuracy),
    ]
    rows += [
        _point_row(f"budget {float(k):.0%} of full MACs", p)
        for k, p in r.at_budget_fraction.items()
    ]
    rows.append(_point_row("chosen (exits.png)", r.chosen))
    return rows


def _diagnostic_rows(r: Report, d: Diagnostics) -> list[list[str]]:
    return [
        [
            str(i + 1),
            _pct(r.per_exit_accuracy["test"][i]),
            _pct(x.ece),
            _num(x.auroc),
            "n/a" if x.teacher_exit is None else str(x.teacher_exit + 1),
            _num(x.mean_score_teacher_right),
            _num(x.mean_score_teacher_wrong),
            _pct(r.chosen.test_exit_share[i]),
            _pct(x.teacher_wrong_exit_share),
        ]
        for i, x in enumerate(d.per_exit)
    ]


def render_diagnostics(r: Report) -> list[str]:
    """The "Diagnostics" section of `report.md` (empty for a report without diagnostics)."""
    d = r.diagnostics
    if d is None:
        return []
    headers = [
        "exit",
        "test accuracy (%)",
        f"ECE (%, {d.ece_bins} bins)",
        "AUROC of exit score",
        "teacher exit",
        "mean score, teacher right",
        "mean score, teacher wrong",
        "images leaving here at the chosen threshold (%)",
        "teacher-wrong images leaving here (%)",
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
        "ones (0.5 = chance; n/a when the exit is right on every image or wrong on every one). "
        f"Teacher: {d.teacher_note}."
        + (
            ""
            if d.teacher_wrong_share is None
            else " Teacher-wrong images: those the reference's final exit gets wrong "
            f"({_pct(d.teacher_wrong_share)} % of the test split)."
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
    ref = r.reference
    exit_heads = ["exit", "cumulative MACs (M)", "% of full", "val accuracy (%)"]
    point_heads = ["criterion", "threshold", "val accuracy (%)", "test accuracy (%)"]
    return "\n".join(
        [
            f"# {r.model} — {r.method} (seed {r.seed})",
            "",
            f"Run: `{r.run}`. Policy: {r.policy}{' (normalised)' if r.normalize else ''}. "
            "Thresholds are chosen on the validation split and reported on the test split.",
            "",
            "## Per exit",
            "",
            markdown_table([*exit_heads, "test accuracy (%)"], _exit_rows(r)),
            "",
            f"Test AUC (mean accuracy over normalised MACs): {100 * r.test_auc:.2f} %. "
            f"Reference: {ref.label}, val {_pct(ref.val_accuracy)} %, "
            f"test {_pct(ref.test_accuracy)} %, "
            f"{ref.macs / 1e6:.3f} M MACs.",
            "",
            "## Operating points (threshold from val, numbers on test)",
            "",
            markdown_table(
                [*point_heads, "test MACs (M)", "MACs reduction vs reference"], _point_rows(r)
            ),
            "",
            "![accuracy vs MACs](tradeoff.png)",
            "",
            "![exit distribution](exits.png)",
            "",
            *render_diagnostics(r),
        ]
    )


def _saving(points: list[OperatingPoint], reduction: str) -> str:
    """Mean ± std of a MACs reduction, or how many seeds never reached the accuracy target."""
    missed = sum(not p.reached for p in points)
    if missed:
        return f"not reached ({missed} of {len(points)} seeds)"
    return _mean_std([getattr(p, reduction) for p in points]) + "x"


def _group_row(label: str, reports: list[Report]) -> list:
    """One table row: a method's runs (one per seed) as mean ± std."""
    per_exit = [
        _mean_std([100 * r.per_exit_accuracy["test"][i] for r in reports])
        for i in range(len(reports[0].exit_macs))
    ]
    at_ref = [r.at_reference_accuracy for r in reports]
    at_own = [r.at_own_full_accuracy for r in reports]
    budgets = []
    for key in reports[0].at_budget_fraction:
        points = [r.at_budget_fraction[key] for r in reports]
        budgets.append(_mean_std([None if p is None else 100 * p.test_accuracy for p in points]))
    return [
        label,
        len(reports),
        " / ".join(per_exit),
        _mean_std([100 * r.test_auc for r in reports]),
        _saving(at_ref, "reduction_vs_reference"),
        _mean_std([100 * p.test_accuracy for p in at_ref]),
        _saving(at_own, "reduction_vs_own_full"),
        _mean_std([100 * p.test_accuracy for p in at_own]),
        *budgets,
    ]


def _per_exit(
    reports: list[Report],
    value: Callable[[ExitDiagnostics], float | None],
    scale: float = 1.0,
    digits: int = 2,
) -> str:
    """`value(exit diagnostics)` per exit as mean ± std over seeds, exits joined by " / "."""

    def get(d: Diagnostics | None, i: int) -> float | None:
        v = None if d is None else value(d.per_exit[i])
        return None if v is None else scale * v

    n = len(reports[0].exit_macs)
    return " / ".join(_mean_std([get(r.diagnostics, i) for r in reports], digits) for i in range(n))


def _diagnostics_row(label: str, reports: list[Report]) -> list:
    """One row of the comparison's diagnostics table: a group's seeds as mean ± std."""
    early = [None if r.diagnostics is None else r.diagnostics.early_exit_error for r in reports]
    return [
        label,
        _per_exit(reports, lambda x: x.ece, scale=100),
        _per_exit(reports, lambda x: x.auroc, digits=3),
        _per_exit(reports, lambda x: x.mean_score_teacher_right, digits=3),
        _per_exit(reports, lambda x: x.mean_score_teacher_wrong, digits=3),
        _mean_std([None if e is None else 100 * e for e in early]),
        _per_exit(reports, lambda x: x.teacher_wrong_exit_share, scale=100),
    ]


def render_comparison_diagnostics(groups: dict[str, list[Report]]) -> list[str]:
    """The comparison's second table: the mechanism diagnostics per group (README, "Evaluation")."""
    headers = [
        "group",
        "ECE per exit (%)",
        "AUROC of exit score per exit",
        "mean exit score, teacher right",
        "mean exit score, teacher wrong",
        "early exits that are wrong (%)",
        "teacher-wrong images leaving per exit (%)",
    ]
    rows = [_diagnostics_row(label, reports) for label, reports in groups.items()]
    return [
        "## Diagnostics (test split)",
        "",
        "Per exit (separated by /), mean ± std over seeds. Lower exit score = more confident; "
        "AUROC: the exit score telling the exit's right answers from its wrong ones; teacher "
        "right/wrong by the reference exit each exit was paired with in training (its final "
        "exit for runs without a pairing); the last two columns at each run's chosen threshold.",
        "",
        markdown_table(headers, rows),
        "",
    ]


def render_comparison(c: Comparison) -> str:
    """`comparison.md`: one row per method, seeds as mean ± std, and the plot."""
    groups = {label: [s.report for s in runs] for label, runs in c.groups.items()}
    first = next(iter(groups.values()))[0]
    headers = [
        "method (model), differing config keys",
        "seeds",
        "test accuracy per exit (%)",
        "test AUC (%)",
        "MACs reduction vs reference at no val loss",
        "test accuracy there (%)",
        "MACs reduction vs own full model at no val loss",
        "test accuracy there (%)",
        *(f"test acc. at {float(k):.0%} MACs budget (%)" for k in first.at_budget_fraction),
    ]
    rows = [_group_row(label, reports) for label, reports in groups.items()]
    return "\n".join(
        [
            "# Comparison",
            "",
            f"Reference: {c.reference.label} — test accuracy {_pct(c.reference.test_accuracy)} "
            f"%, {c.reference.macs / 1e6:.3f} M MACs per image. Thresholds chosen on each run's "
            f"validation split (target: reference val accuracy - {c.max_drop_points:g} pt; "
            "budgets as fractions of the student's full MACs), numbers reported on the test "
            "split; mean ± std over seeds.",
            "",
            markdown_table(headers, rows),
            "",
            "![comparison](comparison.png)",
            "",
            *render_comparison_diagnostics(groups),
        ]
    )
