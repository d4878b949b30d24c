import csv
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from markdown_tables import markdown_tables, seeds_text, table_rows

from erde.errors import ErdeError
from erde.evaluation.cache import LogitsCache
from erde.evaluation.calibrate import Calibration, apply, calibrate_for_budget
from erde.evaluation.compare import aggregate, mean_std_curves
from erde.evaluation.diagnostics import ReferenceLogits, diagnose
from erde.evaluation.metrics import auc
from erde.evaluation.policy import confidence_scores
from erde.evaluation.render import render_comparison, render_report
from erde.evaluation.summary import summarize
from erde.evaluation.sweep import Curve, sweep, write_curve_csv
from erde.files import write_json
from erde.run.model_info import DataInfo, ModelInfo
from erde.run.report import Reference, markdown_table, read_report


def curve(macs, accuracy, exit_macs=(10.0, 40.0)) -> Curve:
    macs = np.asarray(macs, dtype=float)
    late = (macs - exit_macs[0]) / (exit_macs[-1] - exit_macs[0])
    return Curve(
        thresholds=np.linspace(1.0, 0.0, len(macs)),
        accuracy=np.asarray(accuracy, dtype=float),
        expected_macs=macs,
        exit_share=np.stack([1 - late, late], axis=1),
        exit_macs=np.asarray(exit_macs, dtype=float),
    )


def test_curve_csv(tmp_path):
    c = curve([10, 25, 40], [0.6, 0.75, 0.9])
    path = tmp_path / "out" / "curve.csv"
    write_curve_csv(path, c)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == [
        "threshold",
        "accuracy",
        "expected_macs",
        "exit1_share",
        "exit2_share",
    ]
    assert [float(r["expected_macs"]) for r in rows] == [10.0, 25.0, 40.0]
    assert [float(r["accuracy"]) for r in rows] == [0.6, 0.75, 0.9]
    assert [float(r["exit2_share"]) for r in rows] == [0.0, 0.5, 1.0]


def test_json_is_numpy_safe_strict_and_atomic(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    write_json(
        path,
        {
            "accuracy": np.float32(0.5),
            "count": np.int64(3),
            "shares": np.array([0.25, 0.75]),
            "tensor": torch.tensor([1, 2]),
            "missing": math.nan,
            "calibration": Calibration(0.5, 0.875, 17.5, "budget"),
            3: (1, 2),
        },
    )
    assert json.loads(path.read_text()) == {
        "accuracy": 0.5,
        "count": 3,
        "shares": [0.25, 0.75],
        "tensor": [1, 2],
        "missing": None,
        "calibration": {
            "threshold": 0.5,
            "val_accuracy": 0.875,
            "val_expected_macs": 17.5,
            "criterion": "budget",
            "reached": True,
        },
        "3": [1, 2],
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp file left


def test_json_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.json"
    path.write_text('{"kept": true}')
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"kept": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_reports_are_readable_by_the_group_like_any_file_the_user_writes(tmp_path):
    previous = os.umask(0o022)
    try:
        write_json(tmp_path / "report.json", {"a": 1})
        write_curve_csv(tmp_path / "curve.csv", curve([10.0, 40.0], [0.5, 0.9]))
    finally:
        os.umask(previous)
    for name in ("report.json", "curve.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_markdown_table():
    table = markdown_table(
        ["method", "acc (%)", "MACs"], [["erde", 93.456789, 12], ["a|b", 1.0, 3]]
    )
    assert table == (
        "| method | acc (%) | MACs |\n|---|---|---|\n| erde | 93.46 | 12 |\n| a\\|b | 1 | 3 |\n"
    )
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(["a", "b", "c"], [[1, 2]])


def test_mean_std_of_two_known_curves():
    a = curve([40, 10], [0.9, 0.5])  # straight line 0.5 -> 0.9
    b = curve([10, 25, 40], [0.7, 0.8, 0.9])  # 0.7 -> 0.8 -> 0.9
    grid, mean, std = mean_std_curves([a, b], n_points=7)
    np.testing.assert_allclose(grid, [10, 15, 20, 25, 30, 35, 40])
    acc_a = 0.5 + 0.4 * (grid - 10) / 30
    acc_b = np.where(grid <= 25, 0.7 + 0.1 * (grid - 10) / 15, 0.8 + 0.1 * (grid - 25) / 15)
    np.testing.assert_allclose(mean, (acc_a + acc_b) / 2)
    np.testing.assert_allclose(std, np.abs(acc_a - acc_b) / math.sqrt(2))  # sample std, n=2


def test_mean_std_uses_the_shared_range_and_averages_equal_macs():
    a = curve([10, 20, 20, 40], [0.5, 0.6, 0.8, 0.9])  # 0.7 at 20 MACs after averaging
    b = curve([20, 30], [0.7, 0.7], exit_macs=(10.0, 40.0))
    grid, mean, std = mean_std_curves([a, b], n_points=3)
    np.testing.assert_allclose(grid, [20, 25, 30])
    np.testing.assert_allclose(mean, [0.7, (0.75 + 0.7) / 2, (0.8 + 0.7) / 2])
    grid, mean, std = mean_std_curves([a], n_points=3)
    np.testing.assert_allclose(std, 0.0)
    with pytest.raises(ErdeError, match="share no MACs range"):
        mean_std_curves([curve([10, 15], [0.5, 0.6]), curve([30, 40], [0.7, 0.8])])


EXIT_MACS = [1_000_000, 2_000_000, 4_000_000]


def summary(
    method: str = "erde",
    seed: int = 0,
    budgets=(0.1, 0.5),
    shift: float = 0.0,
    reference: Reference | None = None,
):
    """A run's summary from random per-exit logits (3 exits, 4 classes), val and test alike."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (64,), generator=g)
    logits = torch.randn(64, 3, 4, generator=g) + shift
    logits[torch.arange(64), :, labels] += torch.tensor([1.0, 2.0, 4.0])  # later exits surer
    cache = LogitsCache(
        {"val": logits, "test": logits}, {"val": labels, "test": labels}, EXIT_MACS, ""
    )
    data = DataInfo("digits", list("abcd"), [0.5], [0.25], 8, 1)
    info = ModelInfo({"name": "resnet8"}, EXIT_MACS, 3_500_000, data, method=method, seed=seed)
    return summarize(cache, info, f"runs/{method}-s{seed}", budgets=budgets, reference=reference)


def test_report_json_round_trip_keeps_its_keys(tmp_path):
    report = summary().report
    report.write(tmp_path / "report.json")
    assert read_report(tmp_path / "report.json") == report
    raw = json.loads((tmp_path / "report.json").read_text())
    assert {"chosen", "at_reference_accuracy", "at_own_full_accuracy", "at_budget_fraction"} < set(
        raw
    )
    assert raw["at_budget_fraction"]["0.1"] is None  # below the first exit's 25 %
    assert set(raw["chosen"]) == {
        "threshold",
        "criterion",
        "val_accuracy",
        "val_expected_macs",
        "test_accuracy",
        "test_expected_macs",
        "test_exit_share",
        "reduction_vs_reference",
        "reduction_vs_own_full",
        "reached",
    }
    assert raw["reference"]["macs"] == EXIT_MACS[-1]  # the run's own final exit: no reference


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda raw: raw.pop("chosen"), "field 'chosen': missing"),
        (
            lambda raw: raw["chosen"].update(threshold="high"),
            "field 'chosen.threshold': input should be a valid number",
        ),
        (
            lambda raw: raw["at_budget_fraction"].update({"0.5": [1]}),
            "field 'at_budget_fraction.0.5': input should be a dictionary",
        ),
        (
            lambda raw: raw.update(normalize="no"),
            "field 'normalize': input should be a valid boolean",
        ),
        (lambda raw: raw["reference"].pop("macs"), "field 'reference.macs': missing"),
        (lambda raw: raw["diagnostics"].pop("per_exit"), "field 'diagnostics.per_exit': missing"),
        (
            lambda raw: raw["diagnostics"]["per_exit"][1].update(auroc="high"),
            r"field 'diagnostics.per_exit\[1\].auroc': input should be a valid number",
        ),
        (
            lambda raw: raw["diagnostics"]["per_exit"][0].update(ece=None),
            r"field 'diagnostics.per_exit\[0\].ece': input should be a valid number",
        ),
        (
            lambda raw: raw["diagnostics"]["per_exit"].pop(),
            "field 'diagnostics.per_exit': must hold one entry per exit",
        ),
        (lambda raw: raw.update(exit_macs=[2, 1, 3]), "field 'exit_macs': must increase"),
    ],
)
def test_read_report_names_what_is_damaged(tmp_path, damage, match):
    path = tmp_path / "report.json"
    summary().report.write(path)
    raw = json.loads(path.read_text())
    damage(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(ErdeError, match=match) as err:
        read_report(path)
    assert "erde evaluate" in str(err.value)


def test_a_report_of_an_earlier_version_reads_without_diagnostics(tmp_path):
    path = tmp_path / "report.json"
    summary().report.write(path)
    raw = json.loads(path.read_text())
    del raw["diagnostics"]
    path.write_text(json.dumps(raw))
    report = read_report(path)
    assert report.diagnostics is None and "Diagnostics" not in render_report(report)


def test_undefined_diagnostics_round_trip_as_null(tmp_path):
    report = summary(budgets=()).report
    report.write(tmp_path / "report.json")
    raw = json.loads((tmp_path / "report.json").read_text())
    assert raw["diagnostics"]["teacher_wrong_share"] is None  # no reference run given
    assert raw["diagnostics"]["per_exit"][0]["mean_score_teacher_right"] is None
    assert read_report(tmp_path / "report.json") == report


def test_read_report_of_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(ErdeError, match="missing"):
        read_report(tmp_path / "report.json")
    (tmp_path / "report.json").write_text("{")
    with pytest.raises(ErdeError, match="corrupt"):
        read_report(tmp_path / "report.json")


ACCURACY = re.compile(r"\d+\.\d{2}( ± \d+\.\d{2})?")
MACS = re.compile(r"\d+\.\d{2} M")
TIMES = re.compile(r"\d+\.\d{2}x")


def check_tables(md: str) -> None:
    """What every table of a report must be: unique column names, and a reason after each n/a."""
    for headers, rows in markdown_tables(md):
        assert len(set(headers)) == len(headers), headers
        for row in rows:
            assert len(row) == len(headers)
            for cell in row:
                # every "n/a" is followed by ": " and a reason
                assert len(re.findall(r"n/a", cell)) == len(re.findall(r"n/a: \w", cell)), cell


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def test_report_markdown_tables_read_on_their_own(tmp_path):
    teacher = Reference("teacher resnet20 (final exit)", 0.8, 0.75, 9_000_000)
    summary(reference=teacher).report.write(tmp_path / "report.json")
    raw = json.loads((tmp_path / "report.json").read_text())  # the numbers, read as JSON
    md = render_report(read_report(tmp_path / "report.json"))
    check_tables(md)
    exits = table_rows(md, "cumulative MACs per image")
    assert [r["exit"] for r in exits] == ["1", "2", "3"]
    for row, macs, val, test in zip(
        exits, raw["exit_macs"], *raw["per_exit_accuracy"].values(), strict=True
    ):
        assert row["cumulative MACs per image"] == f"{macs / 1e6:.2f} M"
        assert (row["val accuracy (%)"], row["test accuracy (%)"]) == (pct(val), pct(test))
    points = table_rows(md, "criterion")
    # Each rule once: the teacher's accuracy, the run's own, and the one budget that has a point.
    assert [p["criterion"].removesuffix(" (chosen)") for p in points] == [
        "keep teacher resnet20 (final exit) val accuracy - 0 pt",
        "keep the run's own final exit val accuracy - 0 pt",
        "budget 50% of full MACs",
    ]
    chosen = [p for p in points if p["criterion"].endswith(" (chosen)")]
    assert len(chosen) == 1 and chosen[0]["criterion"] == raw["chosen_by"] + " (chosen)"
    c = raw["chosen"]
    assert chosen[0]["val accuracy (%)"] == pct(c["val_accuracy"])
    assert chosen[0]["test accuracy (%)"] == pct(c["test_accuracy"])
    assert chosen[0]["test MACs per image"] == f"{c['test_expected_macs'] / 1e6:.2f} M"
    assert chosen[0]["MACs reduction vs reference"] == f"{c['reduction_vs_reference']:.2f}x"
    budget = raw["at_budget_fraction"]["0.5"]
    assert points[2]["test accuracy (%)"] == pct(budget["test_accuracy"])
    assert all(MACS.fullmatch(p["test MACs per image"]) for p in points)
    assert all(TIMES.fullmatch(p["MACs reduction vs reference"]) for p in points)
    # The budget without a point is named under the table, with the reason.
    assert "No point for budget 10% of full MACs: budget below the first exit's cost" in md
    assert "## Diagnostics (test split)" in md and "![diagnostics](diagnostics.png)" in md


def test_report_diagnostics_without_a_reference_leave_the_teacher_columns_out():
    md = render_report(summary().report)  # no reference run
    check_tables(md)
    (head,) = [t[0] for t in markdown_tables(md) if "ECE (%, 15 bins)" in t[0]]
    assert not any("teacher" in h for h in head)
    assert "No teacher columns: no reference run given (--reference TEACHER)." in md


def test_report_diagnostics_with_a_reference_count_the_teacher_wrong_images():
    """The teacher-wrong share is a count of images too: a handful of them must read as such."""
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, (60,), generator=g)
    logits = torch.randn(60, 3, 4, generator=g)
    teacher = torch.randn(60, 2, 4, generator=g)
    teacher[torch.arange(60), -1, labels] += 9.0  # the final teacher exit is right ...
    teacher[:7, -1] = 0.0
    teacher[torch.arange(7), -1, (labels[:7] + 1) % 4] = 9.0  # ... except on the first 7
    cache = LogitsCache(
        {"val": logits, "test": logits}, {"val": labels, "test": labels}, EXIT_MACS, ""
    )
    data = DataInfo("digits", list("abcd"), [0.5], [0.25], 8, 1)
    info = ModelInfo({"name": "resnet8"}, EXIT_MACS, 3_500_000, data, method="erde", seed=0)
    ref = ReferenceLogits("t", teacher, labels)
    report = summarize(cache, info, "runs/x", teacher=ref).report
    assert report.diagnostics.teacher_wrong_images == 7
    md = render_report(report)
    rows = table_rows(md, "teacher exit")
    assert "teacher-wrong images leaving here (% of 7)" in rows[0]
    assert "(11.67 % of the test split, 7 images)" in md  # 7 / 60


def test_comparison_table_has_a_legend_and_the_numbers_of_its_reports(tmp_path):
    runs = [summary("kd", 0), summary("erde", 0), summary("kd", 1, shift=0.3)]
    comparison = aggregate(runs, max_drop=1.0)
    write_json(tmp_path / "comparison.json", comparison.to_json())
    raw = json.loads((tmp_path / "comparison.json").read_text())
    md = render_comparison(comparison)
    check_tables(md)
    rows = table_rows(md, "seeds")
    headers = list(rows[0])
    assert headers == [
        "group",
        "seeds",
        "test accuracy per exit (%)",
        "test AUC, own MACs range (%)",
        "keep own val accuracy: MACs reduction at test accuracy",  # no reference: no "keep ref"
        "budget 50% of full MACs: test accuracy (%)",  # 10% is below every first exit
    ]
    legend = md.split("![comparison]")[0].rsplit("|\n", 1)[1]  # between the table and the plot
    for header in headers:
        assert f"**{header}**" in legend  # every column defined under the table
    assert "Left out: budget 10% of full MACs, below the first exit's cost in every run" in legend
    assert "own final-exit val accuracy - 1 pt" in legend
    for row in rows:
        group = raw["groups"][row["group"]]["summaries"]
        assert row["seeds"] == str(len(group))
        per_exit = [
            seeds_text([100 * r["per_exit_accuracy"]["test"][i] for r in group]) for i in range(3)
        ]
        assert row["test accuracy per exit (%)"] == " / ".join(per_exit)
        assert row["test AUC, own MACs range (%)"] == seeds_text(
            [100 * r["test_auc"] for r in group]
        )
        own = [r["at_own_full_accuracy"] for r in group]
        if all(p["reached"] for p in own):
            times = seeds_text([p["reduction_vs_own_full"] for p in own], "x")
            accuracy = seeds_text([100 * p["test_accuracy"] for p in own], " %")
            assert row[headers[4]] == f"{times} at {accuracy}"
        else:
            missed = sum(not p["reached"] for p in own)
            assert row[headers[4]] == f"n/a: not reached on val ({missed} of {len(own)} seeds)"
        budget = [100 * r["at_budget_fraction"]["0.5"]["test_accuracy"] for r in group]
        assert row[headers[5]] == seeds_text(budget)
        for cell in (row["test AUC, own MACs range (%)"], row[headers[5]]):
            assert ACCURACY.fullmatch(cell)
    assert (
        rows[0]["group"] == "kd (resnet8)" and "±" in rows[0]["test AUC, own MACs range (%)"]
    )  # 2 seeds
    assert "Reference: each run's own final exit (no reference run given)." in md


def test_a_report_of_an_earlier_erde_reads_with_its_rule_and_exits_from_one(tmp_path):
    path = tmp_path / "report.json"
    report = summary().report
    report.write(path)
    raw = json.loads(path.read_text())
    del raw["format_version"], raw["chosen_by"]  # version 1 before the rule was recorded,
    # with 0-based teacher exits
    for i, x in enumerate(raw["diagnostics"]["per_exit"]):
        x["teacher_exit"] = i
    path.write_text(json.dumps(raw))
    earlier = read_report(path)
    assert earlier.chosen_by == report.chosen_by  # an evaluation after the update is no conflict
    assert earlier.criterion == "keep the run's own final exit val accuracy - 0 pt (entropy policy)"
    assert [x.teacher_exit for x in earlier.diagnostics.per_exit] == [1, 2, 3]


class CountingScore:
    """The exit-score function, recording each logits tensor it scores."""

    def __init__(self):
        self.scored: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, policy: str, normalize: bool) -> torch.Tensor:
        self.scored.append(logits)
        return confidence_scores(logits, policy, normalize)


def test_summarize_scores_each_split_once_and_reports_what_the_separate_steps_give():
    g = torch.Generator().manual_seed(3)
    labels = {s: torch.randint(0, 4, (80,), generator=g) for s in ("val", "test")}
    logits = {s: torch.randn(80, 3, 4, generator=g) * 2 for s in ("val", "test")}
    cache = LogitsCache(logits, labels, EXIT_MACS, "")
    data = DataInfo("digits", list("abcd"), [0.5], [0.25], 8, 1)
    info = ModelInfo({"name": "resnet8"}, EXIT_MACS, 3_500_000, data, method="erde", seed=0)
    teacher = ReferenceLogits("t", logits["test"].flip(1), labels["test"])
    count = CountingScore()
    options = {"policy": "maxprob", "budget": 0.6, "teacher": teacher, "budgets": (0.5, 0.9)}
    report = summarize(cache, info, "runs/x", score=count, **options).report
    # every sweep, operating point (4 of them) and the diagnostics read one scoring per split
    assert len(count.scored) == 2
    assert count.scored[0] is logits["val"] and count.scored[1] is logits["test"]
    # ... and say what scoring again at each step says
    val_curve = sweep(logits["val"], labels["val"], EXIT_MACS, policy="maxprob")
    budget = calibrate_for_budget(val_curve, 0.6 * EXIT_MACS[-1])
    assert report.chosen == apply(logits["test"], labels["test"], EXIT_MACS, budget, "maxprob")
    test = (logits["test"], labels["test"])
    diagnostics = diagnose(*test, threshold=budget.threshold, policy="maxprob", teacher=teacher)
    assert report.diagnostics == diagnostics
    test_curve = sweep(logits["test"], labels["test"], EXIT_MACS, policy="maxprob")
    assert report.test_auc == auc(test_curve, EXIT_MACS[-1])
