"""`erde evaluate` and `erde compare`: run folders in, report files out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from erde import checkpoint as ckpt
from erde.errors import ErdeError
from erde.evaluation.cache import load_cache
from erde.evaluation.calibrate import resolve_budget
from erde.evaluation.metrics import check_budget
from erde.evaluation.summary import Reference, check_max_drop, reference_from_cache, summarize
from erde.evaluation.sweep import Curve
from erde.report import (
    markdown_table,
    mean_std_curves,
    plot_exit_distribution,
    plot_tradeoff,
    write_curve_csv,
    write_json,
)


def run_reference(run_dir: str | Path, *, refresh: bool = False, device: str = "auto") -> Reference:
    """A finished run (normally the teacher) as the accuracy to keep and the MACs to beat.

    Its MACs are those of the plain network (no intermediate heads): the honest cost of deploying
    the reference without early exits.
    """
    cache = load_cache(run_dir, refresh=refresh, device=device)
    _, meta = ckpt.load_weights(Path(run_dir))
    label = f"{meta.get('method', 'reference')} {meta['arch']['name']} (final exit)"
    return reference_from_cache(cache, label, meta.get("backbone_macs", cache.exit_macs[-1]))


def check_budget_fits(budget: float, exit_macs: Sequence[float]) -> None:
    """A `--budget` (fraction of the full model or MACs per image) checked against the exits'
    costs alone, before any logits exist."""
    macs = np.asarray(exit_macs, dtype=float)
    nothing = np.empty(0)
    check_budget(
        Curve(nothing, nothing, nothing, np.empty((0, len(macs))), macs),  # costs, no thresholds
        resolve_budget(budget, float(macs[-1])),
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _point_row(name: str, p: dict | None) -> list[str]:
    if p is None:
        return [name, "below the first exit's cost", "", "", "", ""]
    reduction = f"{p['reduction_vs_reference']:.2f}x"
    if not p.get("reached", True):
        reduction += " (target not reached on val: full model)"
    return [
        name,
        f"{p['threshold']:.4g}",
        _pct(p["val_accuracy"]),
        _pct(p["test_accuracy"]),
        f"{p['test_expected_macs'] / 1e6:.3f}",
        reduction,
    ]


def _saving(points: list[dict], key: str) -> str:
    """Mean ± std of a MACs reduction, or how many seeds never reached the accuracy target."""
    missed = sum(not p["reached"] for p in points)
    if missed:
        return f"not reached ({missed} of {len(points)} seeds)"
    return _mean_std([p[key] for p in points]) + "x"


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
) -> dict:
    """Cache logits, sweep thresholds, calibrate on val, report on test; returns report.json."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "eval"
    _, meta = ckpt.load_weights(run_dir)
    # Every mistake is reported before the model runs to fill a cache.
    check_max_drop(max_drop)
    if budget is not None and "exit_macs" in meta:
        check_budget_fits(budget, meta["exit_macs"])
    ref = run_reference(reference, device=device) if reference else None
    cache = load_cache(run_dir, refresh=refresh, device=device)
    result = summarize(
        cache,
        policy=policy,
        normalize=normalize,
        reference=ref,
        max_drop=max_drop,
        budget=budget,
        budgets=budgets,
    )
    s = result.summary
    s.update(
        {
            "run": str(run_dir),
            "model": meta["arch"]["name"],
            "method": meta.get("method"),
            "seed": meta.get("seed"),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", s)
    write_curve_csv(out / "curve.csv", result.test_curve)
    write_curve_csv(out / "curve_val.csv", result.val_curve)
    refpt = {
        "label": f"{s['reference']['label']}, test",
        "macs": s["reference"]["macs"],
        "accuracy": s["reference"]["test_accuracy"],
    }
    plot_tradeoff(
        out / "tradeoff.png",
        [
            {
                "label": "val",
                "macs": result.val_curve.expected_macs,
                "accuracy": result.val_curve.accuracy,
                "std": None,
            },
            {
                "label": "test",
                "macs": result.test_curve.expected_macs,
                "accuracy": result.test_curve.accuracy,
                "std": None,
            },
        ],
        refpt,
        title=f"{s['model']} ({s['method']}): accuracy vs MACs, {policy} policy",
    )
    plot_exit_distribution(
        out / "exits.png",
        np.asarray(s["chosen"]["test_exit_share"]),
        [f"exit {i + 1}" for i in range(len(cache.exit_macs))],
        title=f"test split: where images exit at threshold {s['chosen']['threshold']:.3g}",
    )
    ckpt.write_text(out / "report.md", render_report(s))
    return s


def render_report(s: dict) -> str:
    macs = s["exit_macs"]
    exit_rows = [
        [
            i + 1,
            f"{m / 1e6:.3f}",
            f"{100 * m / macs[-1]:.1f}",
            _pct(s["per_exit_accuracy"]["val"][i]),
            _pct(s["per_exit_accuracy"]["test"][i]),
        ]
        for i, m in enumerate(macs)
    ]
    ref = s["reference"]
    points = [
        _point_row(
            f"keep {ref['label']} val accuracy - {s['max_drop_points']:g} pt",
            s["at_reference_accuracy"],
        ),
        _point_row(
            f"keep the run's own final-exit val accuracy - {s['max_drop_points']:g} pt",
            s["at_own_full_accuracy"],
        ),
    ]
    points += [
        _point_row(f"budget {float(k):.0%} of full MACs", p)
        for k, p in s["at_budget_fraction"].items()
    ]
    points.append(_point_row("chosen (exits.png)", s["chosen"]))
    return "\n".join(
        [
            f"# {s['model']} — {s['method']} (seed {s['seed']})",
            "",
            f"Run: `{s['run']}`. Policy: {s['policy']}{' (normalised)' if s['normalize'] else ''}. "
            "Thresholds are chosen on the validation split and reported on the test split.",
            "",
            "## Per exit",
            "",
            markdown_table(
                [
                    "exit",
                    "cumulative MACs (M)",
                    "% of full",
                    "val accuracy (%)",
                    "test accuracy (%)",
                ],
                exit_rows,
            ),
            "",
            f"Test AUC (mean accuracy over normalised MACs): {100 * s['test_auc']:.2f} %. "
            f"Reference: {ref['label']}, val {_pct(ref['val_accuracy'])} %, "
            f"test {_pct(ref['test_accuracy'])} %, "
            f"{ref['macs'] / 1e6:.3f} M MACs.",
            "",
            "## Operating points (threshold from val, numbers on test)",
            "",
            markdown_table(
                [
                    "criterion",
                    "threshold",
                    "val accuracy (%)",
                    "test accuracy (%)",
                    "test MACs (M)",
                    "MACs reduction vs reference",
                ],
                points,
            ),
            "",
            "![accuracy vs MACs](tradeoff.png)",
            "",
            "![exit distribution](exits.png)",
            "",
        ]
    )


def _mean_std(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}"


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
) -> dict:
    """Runs grouped by method (seeds averaged, mean ± std) on one table and one plot."""
    if not run_dirs:
        raise ErdeError("give at least one run folder to compare")
    out = Path(out)
    ref = run_reference(reference, device=device) if reference else None
    groups: dict[str, list] = {}
    for run in run_dirs:
        cache = load_cache(run, device=device)
        _, meta = ckpt.load_weights(Path(run))
        result = summarize(
            cache,
            policy=policy,
            normalize=normalize,
            reference=ref,
            max_drop=max_drop,
            budgets=budgets,
        )
        label = f"{meta.get('method')} ({meta['arch']['name']})"
        groups.setdefault(label, []).append((str(run), result))
    rows, series, table = [], [], {}
    for label, results in groups.items():
        sums = [r.summary for _, r in results]
        n_exits = len(sums[0]["exit_macs"])
        per_exit = [
            _mean_std([100 * x["per_exit_accuracy"]["test"][i] for x in sums])
            for i in range(n_exits)
        ]
        at_ref = [x["at_reference_accuracy"] for x in sums]
        at_own = [x["at_own_full_accuracy"] for x in sums]
        budget_cells = []
        for key in sums[0]["at_budget_fraction"]:
            pts = [x["at_budget_fraction"][key] for x in sums]
            budget_cells.append(
                _mean_std([None if p is None else 100 * p["test_accuracy"] for p in pts])
            )
        rows.append(
            [
                label,
                len(sums),
                " / ".join(per_exit),
                _mean_std([100 * x["test_auc"] for x in sums]),
                _saving(at_ref, "reduction_vs_reference"),
                _mean_std([100 * p["test_accuracy"] for p in at_ref]),
                _saving(at_own, "reduction_vs_own_full"),
                _mean_std([100 * p["test_accuracy"] for p in at_own]),
                *budget_cells,
            ]
        )
        table[label] = {"runs": [r for r, _ in results], "summaries": sums}
        macs, mean, std = mean_std_curves([r.test_curve for _, r in results])
        series.append(
            {
                "label": f"{label}, n={len(sums)}",
                "macs": macs,
                "accuracy": mean,
                "std": std if len(sums) > 1 else None,
            }
        )
    budget_heads = [
        f"test acc. at {float(k):.0%} MACs budget (%)"
        for k in groups[next(iter(groups))][0][1].summary["at_budget_fraction"]
    ]
    headers = [
        "method (model)",
        "seeds",
        "test accuracy per exit (%)",
        "test AUC (%)",
        "MACs reduction vs reference at no val loss",
        "test accuracy there (%)",
        "MACs reduction vs own full model at no val loss",
        "test accuracy there (%)",
        *budget_heads,
    ]
    first = next(iter(table.values()))["summaries"][0]
    reference_info = first["reference"]
    refpt = {
        "label": f"{reference_info['label']}, test",
        "macs": reference_info["macs"],
        "accuracy": reference_info["test_accuracy"],
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_tradeoff(
        out / "comparison.png",
        series,
        refpt,
        title=f"test split: accuracy vs expected MACs ({policy} policy)",
    )
    md = "\n".join(
        [
            "# Comparison",
            "",
            f"Reference: {reference_info['label']} — test accuracy {_pct(refpt['accuracy'])} %, "
            f"{refpt['macs'] / 1e6:.3f} M MACs per image. Thresholds chosen on each run's "
            f"validation split (target: reference val accuracy - {max_drop:g} pt; budgets as "
            "fractions of the student's full MACs), numbers reported on the test split; "
            "mean ± std over seeds.",
            "",
            markdown_table(headers, rows),
            "",
            "![comparison](comparison.png)",
            "",
        ]
    )
    ckpt.write_text(out / "comparison.md", md)
    result = {
        "reference": reference_info,
        "policy": policy,
        "max_drop_points": max_drop,
        "groups": table,
    }
    write_json(out / "comparison.json", result)
    return result
