import csv
import dataclasses
import json
import math
import os
import struct

import numpy as np
import pytest
import torch

from erde.errors import ErdeError
from erde.evaluation.cache import LogitsCache
from erde.evaluation.calibrate import Calibration
from erde.evaluation.compare import aggregate, mean_std_curves
from erde.evaluation.plots import plot_diagnostics, plot_exit_distribution, plot_tradeoff
from erde.evaluation.render import render_comparison, render_report
from erde.evaluation.summary import summarize
from erde.evaluation.sweep import Curve, write_curve_csv
from erde.files import write_json
from erde.model_info import DataInfo, ModelInfo
from erde.report import markdown_table, read_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


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


def test_plot_tradeoff(tmp_path):
    macs = np.linspace(1e6, 4e6, 50)
    series = [
        {"label": "erde (test)", "macs": macs, "accuracy": np.linspace(0.6, 0.9, 50), "std": None},
        {
            "label": "kd (test)",
            "macs": macs[::-1],
            "accuracy": np.linspace(0.85, 0.55, 50),
            "std": np.full(50, 0.02),
        },
    ]
    reference = {"label": "teacher", "macs": 8e6, "accuracy": 0.92}
    path = tmp_path / "tradeoff.png"
    plot_tradeoff(path, series, reference, title="CIFAR-10 test split")
    width, height = png_size(path)
    assert 600 < width < 1400 and 400 < height < 1000  # 6.4 x 4.4 in at 150 dpi, trimmed
    assert path.stat().st_size > 10_000


def test_plot_exit_distribution(tmp_path):
    path = tmp_path / "exits.png"
    plot_exit_distribution(path, [0.5, 0.375, 0.125], ["exit 1", "exit 2", "final"], "test split")
    width, height = png_size(path)
    assert 600 < width < 1400 and 300 < height < 900
    assert path.stat().st_size > 5_000
    with pytest.raises(ValueError, match="2 exit labels for 3 exits"):
        plot_exit_distribution(path, [0.5, 0.375, 0.125], ["a", "b"], "test split")


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


def summary(method: str = "erde", seed: int = 0, budgets=(0.1, 0.5), shift: float = 0.0):
    """A run's summary from random per-exit logits (3 exits, 4 classes), val and test alike."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (64,), generator=g)
    logits = torch.randn(64, 3, 4, generator=g) + shift
    logits[torch.arange(64), :, labels] += torch.tensor([1.0, 2.0, 4.0])  # later exits surer
    cache = LogitsCache(
        {"val": logits, "test": logits}, {"val": labels, "test": labels}, [10, 20, 40], ""
    )
    data = DataInfo("digits", list("abcd"), [0.5], [0.25], 8, 1)
    info = ModelInfo({"name": "resnet8"}, [10, 20, 40], 35, data, method=method, seed=seed)
    return summarize(cache, info, f"runs/{method}-s{seed}", budgets=budgets)


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
    assert raw["reference"]["macs"] == 40  # the run's own final exit: no reference run given


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda raw: raw.pop("chosen"), "no 'chosen' entry"),
        (lambda raw: raw["chosen"].update(threshold="high"), "'chosen.threshold' must be a number"),
        (lambda raw: raw["at_budget_fraction"].update({"0.5": [1]}), "is not a JSON object"),
        (lambda raw: raw.update(normalize="no"), "'normalize' must be a bool"),
        (lambda raw: raw["reference"].pop("macs"), "'reference' has no 'macs' entry"),
        (lambda raw: raw["diagnostics"].pop("per_exit"), "'diagnostics' has no 'per_exit'"),
        (
            lambda raw: raw["diagnostics"]["per_exit"][1].update(auroc="high"),
            r"'diagnostics.per_exit\[1\].auroc' must be a number",
        ),
        (
            lambda raw: raw["diagnostics"]["per_exit"][0].update(ece=None),
            r"'diagnostics.per_exit\[0\].ece' must be a number",
        ),
        (lambda raw: raw["diagnostics"]["per_exit"].pop(), "one entry per exit"),
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


def test_plot_diagnostics(tmp_path):
    path = tmp_path / "diagnostics.png"
    plot_diagnostics(path, summary().report)
    width, height = png_size(path)
    assert 1500 < width < 2600 and 400 < height < 900  # 14 x 4 in at 150 dpi, trimmed
    with pytest.raises(ValueError, match="no diagnostics"):
        plot_diagnostics(path, dataclasses.replace(summary().report, diagnostics=None))


def test_read_report_of_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(ErdeError, match="missing"):
        read_report(tmp_path / "report.json")
    (tmp_path / "report.json").write_text("{")
    with pytest.raises(ErdeError, match="corrupt"):
        read_report(tmp_path / "report.json")


def test_report_markdown_states_every_operating_point():
    md = render_report(summary().report)
    assert "# resnet8 — erde (seed 0)" in md
    assert "| budget 10% of full MACs | below the first exit's cost |" in md
    for name in ("keep the run's own final-exit", "budget 50% of full MACs", "chosen (exits.png)"):
        assert f"| {name}" in md
    assert "## Diagnostics (test split)" in md and "![diagnostics](diagnostics.png)" in md
    assert "Teacher: n/a: no reference run given" in md


def test_aggregate_groups_seeds_by_method_and_model():
    runs = [summary("kd", 0), summary("erde", 0), summary("kd", 1, shift=0.3)]
    comparison = aggregate(runs, max_drop=1.0)
    assert list(comparison.groups) == ["kd (resnet8)", "erde (resnet8)"]
    assert [s.report.seed for s in comparison.groups["kd (resnet8)"]] == [0, 1]
    assert comparison.reference == runs[0].report.reference
    raw = comparison.to_json()
    assert raw["groups"]["kd (resnet8)"]["runs"] == ["runs/kd-s0", "runs/kd-s1"]
    md = render_comparison(comparison)
    assert "| kd (resnet8) | 2 |" in md and "| erde (resnet8) | 1 |" in md
    assert "reference val accuracy - 1 pt" in md
