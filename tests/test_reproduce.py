"""`erde quickstart` (the protocol on digits) and the evaluation reports built on its runs."""

import csv
import json
import logging
import resource
import shutil
import time

import numpy as np
import pytest
import torch

from erde.cli.main import main
from erde.config.schema import load_reproduce_config, preset_names, stage_config
from erde.data import ImageData
from erde.data.prepare import data_info
from erde.errors import ErdeError
from erde.evaluation.cache import LogitsCache, load_cache, read_cache, save_cache
from erde.evaluation.policy import confidence_scores, simulate
from erde.models.build import build_model
from erde.run.report import read_report

CACHE = "logits.safetensors"  # the run-folder layout, spelled out independently of the code
SHORT = ["teacher.train.epochs=2", "student.train.epochs=2"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "qs"
    assert main(["quickstart", *SHORT, "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.slow
def test_quickstart_runs_the_whole_protocol(quick, capsys):
    for run in ("teacher", "ce-s0", "kd-s0", "kd-masked-s0", "erde-s0"):
        meta = json.loads((quick / run / "model.json").read_text())
        assert meta["finished"]
    assert (quick / "comparison.png").read_bytes()[:8] == PNG
    table = (quick / "comparison.md").read_text()
    for method in (
        "teacher (resnet20)",
        "ce (resnet8)",
        "kd (resnet8)",
        "kd-masked (resnet8)",
        "erde (resnet8)",
    ):
        assert f"| {method} | 1 |" in table
    result = json.loads((quick / "comparison.json").read_text())
    assert set(result["groups"]) == {
        "teacher (resnet20)",
        "ce (resnet8)",
        "kd (resnet8)",
        "kd-masked (resnet8)",
        "erde (resnet8)",
    }
    # Students learned from the teacher of the protocol, ce from no one.
    assert json.loads((quick / "erde-s0" / "model.json").read_text())["teacher"] == str(
        quick / "teacher"
    )
    assert json.loads((quick / "ce-s0" / "model.json").read_text())["teacher"] is None
    # Every run it trained is evaluated, ready for `erde export`.
    for run in ("teacher", "ce-s0", "kd-s0", "kd-masked-s0", "erde-s0"):
        assert json.loads((quick / run / "eval" / "report.json").read_text())["chosen"]


@pytest.mark.slow
def test_quickstart_again_keeps_finished_runs(quick, caplog):
    caplog.set_level(logging.INFO, logger="erde")  # whatever an earlier test left the level at
    before = {p: p.stat().st_mtime_ns for p in quick.glob("*/model.safetensors")}
    assert main(["quickstart", *SHORT, "--out", str(quick), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in quick.glob("*/model.safetensors")} == before
    assert "kept 4 finished run(s) from earlier: ce-s0, kd-s0" in caplog.text


@pytest.mark.slow
def test_interrupted_reproduction_trains_only_what_is_missing(quick, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(quick, out)
    shutil.rmtree(out / "kd-s0")
    kept = (out / "erde-s0" / "model.safetensors").stat().st_mtime_ns
    assert main(["quickstart", *SHORT, "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "kd-s0" / "model.json").read_text())["finished"]
    assert (out / "erde-s0" / "model.safetensors").stat().st_mtime_ns == kept


@pytest.mark.slow
def test_evaluate_writes_the_report_and_chooses_on_val(quick, capsys):
    run = quick / "erde-s0"
    deployed = (run / "eval" / "report.json").read_bytes()  # written by the quickstart
    code = main(["evaluate", str(run), "--reference", str(quick / "teacher"), "--max-drop", "1"])
    assert code == 0
    # Another criterion goes to its own folder: the threshold export deploys stays as it was.
    assert (run / "eval" / "report.json").read_bytes() == deployed
    report = json.loads((run / "eval-drop1" / "report.json").read_text())
    for name in ("report.md", "curve.csv", "tradeoff.png", "exits.png"):
        assert (run / "eval-drop1" / name).is_file()
    with open(run / "eval-drop1" / "curve.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) > 10 and {"threshold", "accuracy", "expected_macs"} <= set(rows[0])
    assert {"exit1_share", "exit3_share"} <= set(rows[0]) and "exit0_share" not in rows[0]
    # The reported test point is what the chosen threshold really gives on the test logits.
    cache = load_cache(run)
    chosen = report["chosen"]
    exit_index, prediction = simulate(cache.logits["test"], chosen["threshold"])
    labels = cache.labels["test"]
    assert chosen["test_accuracy"] == pytest.approx((prediction == labels).double().mean().item())
    macs = torch.tensor(report["exit_macs"], dtype=torch.float64)
    assert chosen["test_expected_macs"] == pytest.approx(macs[exit_index].mean().item())
    assert report["reference"]["label"].startswith("teacher resnet20")
    # ... and it was chosen on val: the val numbers it records are its own on the val logits, and
    # no threshold reaches the target (teacher's val accuracy - 1 pt) on val with fewer MACs.
    # Every distinct threshold is tried by hand: 0, and one float32 step above each score.
    val, val_labels = cache.logits["val"], cache.labels["val"]
    target = report["reference"]["val_accuracy"] - 0.01

    def on_val(theta: float) -> tuple[float, float]:
        exits, predicted = simulate(val, theta)
        return (predicted == val_labels).double().mean().item(), macs[exits].mean().item()

    assert on_val(chosen["threshold"]) == pytest.approx(
        (chosen["val_accuracy"], chosen["val_expected_macs"])
    )
    scores = confidence_scores(val)[:, :-1].numpy().reshape(-1)
    steps = np.nextafter(np.unique(scores), np.float32(np.inf)).tolist()
    reaching = [m for a, m in map(on_val, [0.0, *steps]) if a >= target]
    if chosen["reached"]:
        assert chosen["val_accuracy"] >= target
        assert chosen["val_expected_macs"] == pytest.approx(min(reaching), rel=1e-12)
    else:
        assert reaching == [] and chosen["threshold"] == 0.0


@pytest.mark.slow
def test_evaluate_refuses_a_cache_of_another_model(quick, tmp_path, capsys):
    run = tmp_path / "kd"
    # Without its eval/ (the study's criterion, which an evaluation without --reference keeps).
    shutil.copytree(quick / "kd-s0", run, ignore=shutil.ignore_patterns("eval"))
    load_cache(quick / "erde-s0")
    shutil.copy(quick / "erde-s0" / "logits.safetensors", run / "logits.safetensors")
    code = main(["evaluate", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "other weights" in err and "--refresh" in err
    assert main(["evaluate", str(run), "--refresh"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "0.01"], "outside what this model can spend"),
        (["--budget", "5e9"], "exceeds"),
        (["--max-drop", "-1"], "max-drop"),
    ],
)
def test_evaluate_bad_operating_points(quick, capsys, argv, message):
    code = main(["evaluate", str(quick / "kd-s0"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err


@pytest.mark.slow
@pytest.mark.parametrize("refresh", [False, True])
def test_a_bad_budget_is_refused_before_the_model_runs(quick, tmp_path, capsys, refresh):
    run = tmp_path / "kd"
    shutil.copytree(quick / "kd-s0", run, ignore=shutil.ignore_patterns(CACHE))
    if refresh:
        load_cache(run)
        before, stamp = (run / CACHE).read_bytes(), (run / CACHE).stat().st_mtime_ns
    argv = ["evaluate", str(run), "--budget", "0.01", *(["--refresh"] if refresh else [])]
    assert main(argv) == 2
    assert "outside what this model can spend" in capsys.readouterr().err
    if refresh:  # not recomputed
        assert (run / CACHE).stat().st_mtime_ns == stamp and (run / CACHE).read_bytes() == before
    else:
        assert not (run / CACHE).exists()


@pytest.mark.slow
def test_refresh_recomputes_the_reference_cache_too(quick, tmp_path):
    """A reference cache altered in a way the normal path trusts (valid digest, the weights' own
    SHA-256): `--refresh` recomputes it, equal to the teacher run by hand on the test images."""
    import os
    import subprocess
    import sys

    from erde.config.schema import load_config
    from erde.data.prepare import prepare_data
    from erde.models.load import load_model

    teacher, run = tmp_path / "teacher", tmp_path / "erde"
    shutil.copytree(quick / "teacher", teacher, ignore=shutil.ignore_patterns("eval*"))
    shutil.copytree(quick / "erde-s0", run, ignore=shutil.ignore_patterns("eval*"))
    true = load_cache(teacher)
    altered = LogitsCache(
        {s: z.roll(1, dims=2) for s, z in true.logits.items()},  # every prediction shifted
        true.labels, true.exit_macs, true.weights_sha256,
    )  # fmt: skip
    save_cache(teacher / CACHE, altered)
    assert read_cache(teacher / CACHE).logits["test"].equal(altered.logits["test"])  # trusted
    argv = ["evaluate", str(run), "--reference", str(teacher), "--refresh", "--device", "cpu"]
    done = subprocess.run(
        [sys.executable, "-m", "erde", *argv],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # By hand: the test images, (x / 255 - mean) / std with the teacher's model.json statistics.
    cfg = load_config(str(teacher / "config.yaml"))
    images = prepare_data(cfg).data.test_x.permute(0, 3, 1, 2).float()
    stats = json.loads((teacher / "model.json").read_text())["data"]
    shift = (torch.tensor(stats["mean"], dtype=torch.float64) * 255).float().view(1, -1, 1, 1)
    scale = (1 / (torch.tensor(stats["std"], dtype=torch.float64) * 255)).float()
    model, _ = load_model(teacher)
    with torch.no_grad():
        chunks = images.split(cfg.train.eval_batch_size)  # the evaluation's own batches
        expected = torch.cat(
            [torch.stack(model((c - shift) * scale.view(1, -1, 1, 1)), 1) for c in chunks]
        )
    assert torch.equal(read_cache(teacher / CACHE).logits["test"], expected)
    report = json.loads((run / "eval" / "report.json").read_text())
    labels = read_cache(teacher / CACHE).labels["test"]
    accuracy = (expected[:, -1].argmax(1) == labels).double().mean().item()
    assert report["reference"]["test_accuracy"] == pytest.approx(accuracy)


@pytest.mark.slow
@pytest.mark.parametrize(
    "criterion, folder",
    [
        (["--policy", "maxprob"], "eval-maxprob"),
        (["--max-drop", "0.5"], "eval-drop0.5"),
        (["--normalize-score"], "eval-normalized"),
    ],
)
def test_a_criterion_folder_is_never_replaced_by_another_reference(
    quick, tmp_path, capsys, criterion, folder
):
    """As RUN/eval/: an evaluation whose criterion (here: the reference) differs from the one in
    RUN/eval-CRITERION/ is refused before any work; the same criterion may rewrite it."""
    run = tmp_path / "erde"
    shutil.copytree(quick / "erde-s0", run, ignore=shutil.ignore_patterns("eval*"))
    teacher = ["--reference", str(quick / "teacher")]
    assert main(["evaluate", str(run), *criterion, *teacher]) == 0
    held = read_report(run / folder / "report.json").criterion
    assert "teacher resnet20" in held
    before = {p: p.read_bytes() for p in (run / folder).iterdir()}
    capsys.readouterr()
    assert main(["evaluate", str(run), *criterion]) == 2  # its own final exit as the reference
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(run / folder) in err and held in err and "--out" in err
    assert {p: p.read_bytes() for p in (run / folder).iterdir()} == before
    assert not (run / "eval").exists()
    assert main(["evaluate", str(run), *criterion, *teacher]) == 0  # the same criterion
    assert main(["evaluate", str(run), *criterion, "--out", str(tmp_path / "own")]) == 0
    assert read_report(tmp_path / "own" / "report.json").criterion != held


def test_logits_cache_round_trip_and_full_disk(tmp_path):
    gen = torch.Generator().manual_seed(0)
    cache = LogitsCache(
        {s: torch.randn(300, 3, 10, generator=gen) for s in ("val", "test")},
        {s: torch.randint(0, 10, (300,), generator=gen) for s in ("val", "test")},
        [10, 20, 30],
        "ab" * 32,
    )
    save_cache(tmp_path / CACHE, cache)
    back = read_cache(tmp_path / CACHE)
    assert (back.exit_macs, back.weights_sha256) == ([10, 20, 30], "ab" * 32)
    for s in ("val", "test"):
        assert torch.equal(back.logits[s], cache.logits[s])
        assert torch.equal(back.labels[s], cache.labels[s])
    # A file-size limit fails the write midway, as a full disk does (Python ignores SIGXFSZ).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(ErdeError, match=r"could not write .*logits.*free disk space"):
            save_cache(tmp_path / "full" / CACHE, cache)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list((tmp_path / "full").iterdir()) == []  # no half-written temporary


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, message",
    [({"finished": False}, "has not finished training"), ({"source": "npz"}, "same data source")],
)
def test_a_reused_teacher_is_checked_before_any_student_trains(
    quick, tmp_path, capsys, change, message
):
    teacher = tmp_path / "teacher"
    shutil.copytree(quick / "teacher", teacher)
    meta = json.loads((teacher / "model.json").read_text())
    meta.update({k: v for k, v in change.items() if k != "source"})
    meta["data"].update({k: v for k, v in change.items() if k == "source"})
    (teacher / "model.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    code = main(["quickstart", *SHORT, "--teacher", str(teacher), "--out", str(out)])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_run_folder_without_checkpoint(quick, tmp_path, capsys):
    run = tmp_path / "half"
    run.mkdir()
    shutil.copy(quick / "kd-s0" / "config.yaml", run / "config.yaml")
    assert main(["evaluate", str(run)]) == 2
    assert "no trained model" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_groups_seeds_and_draws_one_plot(quick, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            str(quick / "kd-s0"),
            str(quick / "erde-s0"),
            "--reference",
            str(quick / "teacher"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert (out / "comparison.png").read_bytes()[:8] == PNG
    assert "| kd (resnet8) | 1 |" in (out / "comparison.md").read_text()


@pytest.mark.parametrize("preset", ["cifar10", "cifar100", "svhn", "cifar10-cpu", "cifar10-gpu"])
def test_paper_scale_presets_load_and_build(preset):
    cfg = load_reproduce_config(preset)
    classes = 100 if preset == "cifar100" else 10
    data = ImageData(
        torch.zeros(1, 32, 32, 3, dtype=torch.uint8),
        torch.zeros(1),
        torch.zeros(1, 32, 32, 3, dtype=torch.uint8),
        torch.zeros(1),
        [str(i) for i in range(classes)],
        cfg.data.source,
        (0.5,) * 3,
        (0.25,) * 3,
        True,
    )
    info = data_info(data)
    teacher = build_model(stage_config(cfg, "teacher", seed=0).model, info)
    student = build_model(
        stage_config(cfg, "student", seed=0, method="erde", teacher="t").model, info
    )
    x = torch.zeros(2, 3, 32, 32)
    assert [o.shape for o in student.eval()(x)][-1] == (2, classes)
    assert teacher.num_exits >= 2 and student.num_exits >= 2
    assert preset in preset_names("reproduce")


@pytest.mark.parametrize(
    ("command", "change", "message"),
    [
        ("reproduce", ["student.model.name=resnet88"], "unknown model 'resnet88'"),
        ("reproduce", ["--grid", "student.model.exits=1,9"], "exit"),
        ("tune", ["student.model.options.depth=3"], "has no option(s) ['depth']"),
    ],
)
def test_a_student_model_typo_is_refused_before_the_teacher_trains(
    tmp_path, capsys, command, change, message
):
    out = tmp_path / "out"
    argv = [command, "--preset", "quickstart", "teacher.train.epochs=1"]
    argv += ["teacher.train.warmup_epochs=0", *change, "--out", str(out), "--no-progress"]
    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < 5  # the teacher would take longer
    # (logging may complain of an earlier test's closed capsys stream: not erde's lines)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("erde ")]
    assert len(lines) == 1 and "the student stage" in lines[0] and message in lines[0]
    assert not out.exists()
