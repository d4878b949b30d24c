"""The static frontier: a step function of the static points, early-exit curves against it (the
boundaries solved by hand for straight-line curves), and digits runs end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_versus import line

from erde.cli.main import main
from erde.config.schema import load_config, load_reproduce_config
from erde.evaluation.cache import read_cache
from erde.evaluation.frontier import StaticPoint, frontier, versus_frontier
from erde.evaluation.plots import FRONTIER_LABEL, plot_comparison
from erde.evaluation.runs import compare_runs
from erde.evaluation.versus import ABOVE, BELOW, WITHIN
from erde.run.layout import RunDir
from erde.study.grid import expand
from erde.train.engine import fit

# A cheap, a dominated (dearer and worse) and a dear point.
POINTS = [
    StaticPoint("static (a)", 1.5e6, 0.56, 0.004, 3),
    StaticPoint("static (b)", 2.0e6, 0.50, 0.0, 3),
    StaticPoint("static (c)", 2.5e6, 0.80, 0.01, 3),
]


def test_the_frontier_is_the_best_static_point_at_or_below_the_macs():
    macs = np.array([1.0e6, 1.5e6, 1.9e6, 2.0e6, 2.49e6, 2.5e6, 9e6])
    mean, std = frontier(POINTS, macs)
    # Below the cheapest: nothing fits; the dominated point never takes over.
    assert np.isnan(mean[0]) and np.isnan(std[0])
    assert mean[1:].tolist() == [0.56, 0.56, 0.56, 0.56, 0.80, 0.80]
    assert std[1:].tolist() == [0.004, 0.004, 0.004, 0.004, 0.01, 0.01]


def test_stretches_against_the_frontier_match_the_hand_solved_crossings():
    # Curve 0.5 -> 0.7 over 1-3 M MACs, seeds offset -d, 0, +d (sample std d): mean at x M MACs
    # is 0.4 + 0.1 x. On [1.5, 2.5) the frontier is 0.56 ± 0.004: below while 0.4 + 0.1 x + d <
    # 0.556 (x < 1.51), above once 0.4 + 0.1 x - d > 0.564 (x > 1.69); on [2.5, 3] it is
    # 0.80 ± 0.01, which the curve (0.7 at most) never reaches. Compared from 1.5 M on.
    d = 0.005
    curves = [line(1e6, 3e6, 0.5 + o, 0.7 + o) for o in (-d, 0, d)]
    v = versus_frontier(curves, POINTS, n_points=1501)
    step = 1.5e6 / 1500
    assert [s.verdict for s in v.stretches] == [BELOW, WITHIN, ABOVE, BELOW]
    below, within, above, dear = v.stretches
    assert below.lo_macs == pytest.approx(1.5e6)
    assert within.lo_macs == pytest.approx(1.51e6, abs=step)
    assert above.lo_macs == pytest.approx(1.69e6, abs=step)
    assert dear.lo_macs == pytest.approx(2.5e6, abs=step) and dear.hi_macs == pytest.approx(3e6)
    assert v.share(ABOVE) == pytest.approx(0.81 / 1.5, abs=0.002)
    # Mean gap on the last stretch: 0.4 + 0.1 x - 0.8 averaged over x in [2.5, 3] = -0.125.
    assert dear.mean_gap == pytest.approx(-0.125, abs=5e-4)
    assert (v.seeds_a, v.seeds_b) == (3, 3)


def test_a_curve_that_ends_below_the_cheapest_static_network_has_no_comparison():
    assert versus_frontier([line(0.5e6, 1.4e6, 0.5, 0.6)], POINTS) is None


def test_static_needs_a_network_without_early_exits(tmp_path, capsys):
    argv = ["train", "digits-student", "distill.method=static", "distill.teacher=t"]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "distill.method=static trains a plain network without early exits" in err
    assert "set model.exits=[]" in err and not (tmp_path / "s").exists()


def test_the_cifar10_cpu_protocol_trains_the_static_ladder():
    variants = {v.name: v for v in expand(load_reproduce_config("cifar10-cpu"))}
    for model in ("resnet8", "resnet14", "resnet20"):
        v = variants[f"static-{model}"]
        assert v.method == "static"
        assert (v.config.student.model.name, v.config.student.model.exits) == (model, "[]")
    assert load_reproduce_config("quickstart").static_models == []


def _accuracy_and_macs(run) -> tuple[float, float]:
    """A static run's test accuracy and MACs, from its logits file."""
    cache = read_cache(RunDir(run).logits)
    right = cache.logits["test"][:, -1].argmax(-1) == cache.labels["test"]
    return float(right.double().mean()), float(cache.exit_macs[-1])


def test_compare_draws_and_states_the_static_frontier_of_digits_runs(teacher, tmp_path):
    one = ["train.epochs=1", "train.warmup_epochs=0", f"distill.teacher={teacher}"]
    runs = {}
    for name, extra in (
        # Longer, so that the static points meet the kd curve rather than lie far below it.
        ("static-resnet8", ["distill.method=static", "model.exits=[]", "train.epochs=3"]),
        ("static-resnet14", ["distill.method=static", "model.exits=[]", "model.name=resnet14"]),
        ("kd-resnet14", ["distill.method=kd", "model.name=resnet14", "train.epochs=2"]),
    ):
        runs[name] = tmp_path / name
        fit(load_config("digits-student", [*one, *extra]), runs[name], progress=False)
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, runs.values()), "--out", str(out)]) == 0
    md = (out / "comparison.md").read_text()
    acc8, macs8 = _accuracy_and_macs(runs["static-resnet8"])
    acc14, macs14 = _accuracy_and_macs(runs["static-resnet14"])
    assert f": {macs8 / 1e6:.2f} M MACs, {100 * acc8:.2f} ± 0.00 % (1 seed)" in md
    assert f": {macs14 / 1e6:.2f} M MACs, {100 * acc14:.2f} ± 0.00 % (1 seed)" in md

    # The kd curve against the step (one seed a side: any difference counts), recomputed from the
    # sweep in the kd run's evaluation, over its MACs from the cheapest static network on.
    assert main(["evaluate", str(runs["kd-resnet14"])]) == 0
    rows = np.genfromtxt(runs["kd-resnet14"] / "eval" / "curve.csv", delimiter=",", names=True)
    macs, acc = np.unique(rows["expected_macs"], return_inverse=True)
    acc = np.bincount(acc, weights=rows["accuracy"]) / np.bincount(acc)
    grid = np.linspace(max(macs[0], macs8), macs[-1], 20001)
    step = np.where(grid >= macs14, max(acc8, acc14), acc8)
    share = float(np.mean(np.interp(grid, macs, acc) > step))
    (sentence,) = [s for s in md.splitlines() if s.startswith("- kd (resnet14)")]
    assert "against the static frontier (1 seed)" in sentence
    stated = re.search(r"above \((\d+) % of the range", sentence)
    assert (int(stated.group(1)) if stated else 0) == pytest.approx(100 * share, abs=1)

    # The plot: the static runs are no curve of their own, but points and the frontier's steps.
    fig = plot_comparison(tmp_path / "c.png", compare_runs(list(runs.values()), out=tmp_path / "c"))
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert FRONTIER_LABEL in labels and not any(t.startswith("static (") for t in labels)
    (steps,) = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    x, y = steps.get_data()
    assert x[:2] == pytest.approx([macs8 / 1e6, macs14 / 1e6])
    assert y[:2] == pytest.approx([100 * acc8, 100 * max(acc8, acc14)])


def test_reproduce_trains_the_static_models_and_compares_against_them(tmp_path):
    out = tmp_path / "study"
    one = [
        f"{s}.train.{k}" for s in ("teacher", "student") for k in ("epochs=1", "warmup_epochs=0")
    ]
    argv = ["reproduce", "--preset", "quickstart", "methods=[kd]", "static_models=[resnet8]"]
    argv += one
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    info = json.loads((out / "static-resnet8-s0" / "model.json").read_text())
    assert info["method"] == "static" and len(info["exit_macs"]) == 1
    assert info["teacher"] == str(out / "teacher")
    md = (out / "comparison.md").read_text()
    assert "## Against the static frontier" in md
    assert any(s.startswith("- kd (resnet8)") and "static frontier" in s for s in md.splitlines())
