"""The plots, read from the matplotlib objects they draw (scales, legend entries, line segments and
markers), not from pixels; the files are checked for being PNGs of the expected size."""

import dataclasses
import struct

import numpy as np
import pytest
import torch

from erde.evaluation.cache import LogitsCache
from erde.evaluation.compare import Comparison, mean_std_curves
from erde.evaluation.plots import (
    EXITS_LABEL,
    GAP,
    LOG_X_RATIO,
    Series,
    break_gaps,
    plot_comparison,
    plot_diagnostics,
    plot_exit_distribution,
    plot_run,
    plot_tradeoff,
)
from erde.evaluation.summary import RunSummary, summarize
from erde.evaluation.sweep import Curve
from erde.run.layout import ReportDir
from erde.run.model_info import DataInfo, ModelInfo
from erde.run.report import Reference

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXIT_MACS = (1e6, 2e6, 4e6)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def curve(macs_m, accuracy) -> Curve:
    """A sweep with the given points (MACs in millions), exits at 1, 2 and 4 M MACs."""
    macs = np.asarray(macs_m, dtype=float) * 1e6
    late = (macs - EXIT_MACS[0]) / (EXIT_MACS[-1] - EXIT_MACS[0])
    return Curve(
        thresholds=np.linspace(1.0, 0.0, len(macs)),
        accuracy=np.asarray(accuracy, dtype=float),
        expected_macs=macs,
        exit_share=np.stack([1 - late, np.zeros_like(late), late], axis=1),
        exit_macs=np.asarray(EXIT_MACS),
    )


def summary(method: str = "kd", seed: int = 0, reference: Reference | None = None) -> RunSummary:
    """A run's summary from random per-exit logits (3 exits, 4 classes), val and test alike."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (64,), generator=g)
    logits = torch.randn(64, 3, 4, generator=g)
    logits[torch.arange(64), :, labels] += torch.tensor([1.0, 2.0, 4.0])
    cache = LogitsCache(
        {"val": logits, "test": logits}, {"val": labels, "test": labels}, list(EXIT_MACS), ""
    )
    data = DataInfo("digits", list("abcd"), [0.5], [0.25], 8, 1)
    info = ModelInfo({"name": "resnet8"}, list(EXIT_MACS), 3.5e6, data, method=method, seed=seed)
    return summarize(cache, info, f"runs/{method}-s{seed}", reference=reference)


def segments(y) -> int:
    """How many separate pieces a line is drawn in: maximal runs of finite values."""
    finite = np.isfinite(np.asarray(y, dtype=float))
    return int(finite[0]) + int(np.sum(finite[1:] & ~finite[:-1]))


def legend_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def line(fig, label: str):
    (found,) = [x for x in fig.axes[0].get_lines() if x.get_label() == label]
    return found


def markers(fig, marker: str):
    return [x for x in fig.axes[0].get_lines() if x.get_marker() == marker]


def test_macs_axis_is_logarithmic_when_the_macs_drawn_span_a_wide_range(tmp_path):
    students = Series("student", np.array([5e6, 8e6, 12e6]), np.array([0.6, 0.7, 0.8]))
    teacher = {"label": "teacher", "accuracy": 0.9}
    wide = plot_tradeoff(tmp_path / "a.png", [students], {**teacher, "macs": 125e6}, title="t")
    assert wide.axes[0].get_xscale() == "log"
    assert "log scale" in wide.axes[0].get_xlabel()
    near = plot_tradeoff(tmp_path / "b.png", [students], {**teacher, "macs": 14e6}, title="t")
    assert near.axes[0].get_xscale() == "linear"
    assert near.axes[0].get_xlabel() == "expected MACs per image (M)"
    for ratio, scale in ((0.99 * LOG_X_RATIO, "linear"), (1.01 * LOG_X_RATIO, "log")):
        s = Series("s", np.array([1e6, ratio * 1e6]), np.array([0.5, 0.6]))
        assert plot_tradeoff(tmp_path / "c.png", [s], title="t").axes[0].get_xscale() == scale


def test_legend_names_the_exit_and_chosen_markers_and_the_seed_band(tmp_path):
    s = Series(
        "kd (resnet8), 3 seeds",
        np.array([1e6, 2e6, 4e6]),
        np.array([0.5, 0.7, 0.8]),
        std=np.array([0.01, 0.02, 0.01]),
        seeds=3,
        exits=([1e6, 2e6, 4e6], [0.5, 0.65, 0.8]),
        chosen=(3e6, 0.75),
    )
    reference = {"label": "teacher resnet20 (final exit), test", "macs": 9e6, "accuracy": 0.9}
    fig = plot_tradeoff(tmp_path / "t.png", [s], reference, title="t", chosen_label="chosen")
    assert legend_texts(fig) == [
        "kd (resnet8), 3 seeds",
        EXITS_LABEL,
        "chosen",
        "mean ± std over 3 seeds",
        "teacher resnet20 (final exit), test",
    ]
    (exits,) = markers(fig, "o")
    np.testing.assert_allclose(exits.get_xdata(), [1, 2, 4])  # MACs in millions
    np.testing.assert_allclose(exits.get_ydata(), [50, 65, 80])  # accuracy in %
    (chosen,) = markers(fig, "D")
    np.testing.assert_allclose([*chosen.get_xdata(), *chosen.get_ydata()], [3, 75])
    assert len(fig.axes[0].collections) == 1  # the band
    width, height = png_size(tmp_path / "t.png")
    assert 900 < width < 1800 and 400 < height < 1000  # 6.4 x 4.4 in and the legend beside


def test_a_sweep_line_breaks_at_its_gaps():
    # Steps of 0.1 M, then 1.8 M and 0.9 M: wider than 5 % of the 3 M exit range (0.15 M).
    for step, pieces in ((0.149, 2), (0.151, 4)):  # either side of that width
        near = curve([1.0, 1.0 + step, 4.0 - step, 4.0], [0.5, 0.6, 0.8, 0.9])
        # 1 -> 1 + step -> 4 - step (a 2.7 M gap) -> 4: one gap, or all three steps
        assert segments(break_gaps(near)[1]) == pieces
    c = curve([3.0, 1.0, 1.1, 1.2, 3.1, 4.0], [0.8, 0.5, 0.52, 0.55, 0.81, 0.9])
    macs, accuracy = break_gaps(c)
    assert segments(accuracy) == 3
    finite = np.isfinite(macs)
    np.testing.assert_allclose(macs[finite] / 1e6, [1.0, 1.1, 1.2, 3.0, 3.1, 4.0])  # in order
    np.testing.assert_allclose(accuracy[finite], [0.5, 0.52, 0.55, 0.8, 0.81, 0.9])


def test_the_run_plot_marks_each_exit_and_the_chosen_point_on_both_splits(tmp_path):
    s = summary()
    gappy = curve([1.0, 1.1, 1.2, 3.0, 3.1, 4.0], [0.5, 0.52, 0.55, 0.8, 0.81, 0.9])
    figures = plot_run(ReportDir(tmp_path), dataclasses.replace(s, test_curve=gappy))
    assert sorted(figures) == ["diagnostics.png", "exits.png", "tradeoff.png"]
    fig = figures["tradeoff.png"]
    assert segments(line(fig, "test").get_ydata()) == 3
    assert segments(line(fig, "val").get_ydata()) == 1  # the real sweep of 64 images: no gap
    r = s.report
    exits = sorted((tuple(m.get_ydata()) for m in markers(fig, "o")), key=len)
    expected = {tuple(100 * np.asarray(r.per_exit_accuracy[k])) for k in ("val", "test")}
    assert {tuple(np.round(e, 9)) for e in exits} == {tuple(np.round(e, 9)) for e in expected}
    chosen = {(m.get_xdata()[0], m.get_ydata()[0]) for m in markers(fig, "D")}
    c = r.chosen
    assert chosen == {
        (c.val_expected_macs / 1e6, 100 * c.val_accuracy),
        (c.test_expected_macs / 1e6, 100 * c.test_accuracy),
    }
    assert f"chosen operating point (threshold {c.threshold:.3g})" in legend_texts(fig)
    assert "the run's own final exit, test" not in legend_texts(fig)  # no star for itself
    for name in figures:
        assert png_size(tmp_path / name)[0] > 500


def test_the_comparison_mean_breaks_where_a_seed_has_no_point(tmp_path):
    dense = curve(np.linspace(1.0, 4.0, 61), np.linspace(0.5, 0.9, 61))
    macs = np.concatenate([np.linspace(1.0, 2.0, 21), np.linspace(3.0, 4.0, 21)])  # 2 -> 3 M
    gap = curve(macs, 0.5 + 0.1 * (macs - 1.0))
    grid, mean, std = mean_std_curves([dense, gap], max_gap=GAP)
    inside = (grid > 2e6) & (grid < 3e6)
    assert inside.any() and np.isnan(mean[inside]).all() and np.isnan(std[inside]).all()
    assert np.isfinite(mean[~inside]).all()
    _, plain, _ = mean_std_curves([dense, gap])  # without max_gap: a straight line across
    assert np.isfinite(plain).all()

    teacher = Reference("teacher resnet20 (final exit)", 0.9, 0.88, 12e6)
    runs = [summary("kd", 0, teacher), summary("kd", 1, teacher)]
    runs = [dataclasses.replace(s, test_curve=c) for s, c in zip(runs, (dense, gap), strict=True)]
    comparison = Comparison(teacher, "entropy", 0.0, {"kd (resnet8)": runs})
    fig = plot_comparison(tmp_path / "comparison.png", comparison)
    assert segments(line(fig, "kd (resnet8), 2 seeds").get_ydata()) == 2
    assert legend_texts(fig) == [
        "kd (resnet8), 2 seeds",
        EXITS_LABEL,
        "chosen operating point (mean over seeds)",
        "mean ± std over 2 seeds",
        "teacher resnet20 (final exit), test",
    ]
    assert fig.axes[0].get_xscale() == "log"  # 1 M to the teacher's 12 M
    (chosen,) = markers(fig, "D")
    expected_x = np.mean([s.report.chosen.test_expected_macs for s in runs]) / 1e6
    assert chosen.get_xdata()[0] == pytest.approx(expected_x)


def test_plot_exit_distribution(tmp_path):
    path = tmp_path / "exits.png"
    fig = plot_exit_distribution(path, [0.5, 0.375, 0.125], ["exit 1", "exit 2", "exit 3"], "t")
    heights = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(heights, [50, 37.5, 12.5])
    width, height = png_size(path)
    assert 600 < width < 1400 and 300 < height < 900
    with pytest.raises(ValueError, match="2 exit labels for 3 exits"):
        plot_exit_distribution(path, [0.5, 0.375, 0.125], ["a", "b"], "test split")


def test_plot_diagnostics(tmp_path):
    path = tmp_path / "diagnostics.png"
    report = summary().report
    fig = plot_diagnostics(path, report)
    assert len(fig.axes) == 4 and not fig.axes[2].axison  # no reference: that panel says so
    # ECE and AUROC each on their own axis, at their own scale
    ece = [p.get_height() for p in fig.axes[0].patches]
    auroc = [p.get_height() for p in fig.axes[1].patches]
    per_exit = report.diagnostics.per_exit
    assert ece == pytest.approx([100 * x.ece for x in per_exit])
    assert auroc == pytest.approx([x.auroc for x in per_exit])
    width, height = png_size(path)
    assert 2000 < width < 3300 and 400 < height < 900  # 18 x 4 in at 150 dpi, trimmed
    with pytest.raises(ValueError, match="no diagnostics"):
        plot_diagnostics(path, dataclasses.replace(report, diagnostics=None))


def test_series_with_the_same_exit_macs_get_exit_markers_of_their_own_shape(tmp_path):
    """Students of one architecture share their exits' MACs: one marker shape per series (shown
    in its legend entry) keeps one from hiding the other."""
    exits = [1e6, 2e6, 4e6]
    series = [
        Series(name, np.array(exits), np.array(acc), exits=(exits, acc))
        for name, acc in (("kd", [0.5, 0.6, 0.8]), ("erde", [0.5, 0.61, 0.8]))
    ]
    fig = plot_tradeoff(tmp_path / "t.png", series, None, title="t", chosen_label="chosen")
    (kd_exits,), (erde_exits,) = markers(fig, "o"), markers(fig, "s")
    np.testing.assert_allclose(erde_exits.get_ydata(), [50, 61, 80])
    assert kd_exits.get_color() == line(fig, "kd").get_color()
    handles = fig.axes[0].get_legend().legend_handles
    assert [h.get_marker() for h in handles[:2]] == ["o", "s"]
