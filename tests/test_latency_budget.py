"""`erde infer --latency-budget`: each exit timed where the model serves, and the val curve's
point chosen from those timings (checked against a brute force over the curve)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from erde.cli.main import main
from erde.deploy import export_run
from erde.deploy.latency_budget import choose_for_latency, exit_latencies
from erde.deploy.manifest import read_manifest
from erde.deploy.runtime import EarlyExitRuntime
from erde.errors import ErdeError
from erde.evaluation.runs import evaluate_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A teacher trained long enough that later exits beat the first: a curve of several
    points (conftest's one-epoch teacher is best at exit 1)."""
    from erde.config.schema import load_config
    from erde.train.engine import fit

    run = tmp_path_factory.mktemp("latency") / "teacher"
    overrides = ["model.name=resnet8", "train.epochs=8", "train.warmup_epochs=0"]
    fit(load_config("digits-teacher", overrides), run, progress=False)
    evaluate_run(run, device="cpu")
    out = run.parent / "export"
    export_run(run, out)
    return out


def _cost(point: dict, ms: list[float]) -> float:
    # np.dot as the code sums, so a budget equal to a cost is an exact tie in both.
    return float(np.dot(point["exit_share"], np.asarray(ms, dtype=np.float64)))


def _brute_force(points: list[dict], ms: list[float], budget: float) -> dict | None:
    best = None
    for p in points:
        cost = _cost(p, ms)
        if cost <= budget and (
            best is None
            or p["val_accuracy"] > best[0]
            or (p["val_accuracy"] == best[0] and cost < best[1])
        ):
            best = (p["val_accuracy"], cost, p)
    return None if best is None else best[2]


def test_the_choice_is_the_most_accurate_point_expected_within_the_budget(exported):
    manifest = read_manifest(exported)
    points = manifest.val_curve["points"]
    assert len(points) > 1
    ms = [1.0, 2.5, 4.0]  # later exits cost more, as they do
    costs = sorted({_cost(p, ms) for p in points})
    # Exactly on a point's cost (the comparison is <=), just below it, and between points.
    budgets = [costs[0], costs[-1], costs[-1] * (1 - 1e-9), (costs[0] + costs[-1]) / 2, 100.0]
    for budget in budgets:
        want = _brute_force(points, ms, budget)
        got = choose_for_latency(manifest, [m / 1000 for m in ms], budget)
        assert got["threshold"] == want["threshold"], budget
    with pytest.raises(ErdeError, match="below what this export can meet here"):
        choose_for_latency(manifest, [m / 1000 for m in ms], costs[0] * (1 - 1e-9))


def test_each_exit_is_timed_with_every_image_forced_out_there(exported):
    runtime = EarlyExitRuntime.from_export(exported, threads=1)
    n = runtime.num_exits
    latencies = exit_latencies(runtime, repeats=3, warmup=1)
    assert len(latencies) == n and all(s > 0 for s in latencies)
    # The forcing exit_latencies relies on: a threshold above every score at exit e, 0 before.
    digits = (load_digits().images[:6] * 255 / 16).round().astype(np.uint8)
    for e in range(n):
        cutoffs = [0.0] * (n - 1)
        if e < n - 1:
            cutoffs[e] = float(np.finfo(np.float32).max)
        for image in digits:
            taken = runtime.predict(image[None, None], threshold=cutoffs, form="single").exits
            assert taken.tolist() == [e + 1]


def test_cli_uses_the_chosen_threshold_and_refuses_an_unmeetable_budget(exported, tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "digit.png"
    Image.fromarray((load_digits().images[0] * 255 / 16).round().astype(np.uint8)).save(png)
    points = read_manifest(exported).val_curve["points"]
    best = max(points, key=lambda p: p["val_accuracy"])
    argv = ["infer", str(exported), str(png), "--threads", "1", "--latency-budget"]
    assert main([*argv, "1e6"]) == 0
    said = capsys.readouterr().err
    assert f"threshold {best['threshold']:.6g} from the export's val curve" in said
    assert main([*argv, "1e-9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below what this export can meet here" in err[0]
