"""`erde tune` on Optuna: a 2-trial study on digits end to end, resumption after Ctrl-C and after
a killed worker, and storages that cannot be opened."""

import json
import math
import os
import re
import subprocess
import sys
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState
from test_faults import as_ordinary_user

import erde.study.tune
from erde.cli.main import main
from erde.config.schema import EvalConfig, load_config, load_reproduce_config, to_yaml
from erde.evaluation.cache import LogitsCache, load_cache, save_cache
from erde.files import write_text
from erde.logs import log_to_stdout
from erde.run.layout import RunDir
from erde.study.tune import open_storage, space, study_name, trial_config, tune, val_auc
from erde.train.engine import fit

# `main` logs to the sys.stdout of its first call: bind it now, not to a test's capsys stream,
# which is closed once that test ends.
log_to_stdout()

TINY = [
    "teacher.model.name=resnet8",
    "teacher.train.epochs=1",
    "student.train.epochs=2",
    "teacher.train.warmup_epochs=0",
    "student.train.warmup_epochs=0",
]


def states(out, method, heartbeat_s=60):
    storage = open_storage(f"sqlite:///{out / 'study.db'}", heartbeat_s)
    study = optuna.load_study(study_name=study_name(out, method), storage=storage)
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_each_method_tunes_the_keys_its_loss_reads():
    assert space("ce") == []
    assert space("kd") == space("kd-masked") == ["distill.alpha", "distill.temperature"]
    assert space("self-kd") == ["distill.alpha", "distill.temperature"]  # no teacher, yet distils
    assert set(space("erde")) == {
        "distill.alpha",
        "distill.temperature",
        "distill.beta",
        "distill.entropy_term",
        "distill.entropy_exits",
    }


def sure(labels: list[int], k: int) -> torch.Tensor:
    """One exit's logits, confident (20 on one class) in the given class of each image."""
    logits = torch.zeros(len(labels), k)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = 20.0
    return logits


def test_the_objective_is_the_auc_of_the_validation_split_alone(tmp_path):
    """A finished run whose cache is replaced by hand-made logits of the same shape: on val, exit
    1 is sure and wrong on images 0-1 and flat on 2-3 (which exit 2 gets right), so the curve is
    0.5 from the first exit's MACs to (m1 + m2) / 2, then a line up to 1.0 at the full model;
    on test every exit is right (AUC 1). The objective must be val's, solved by hand."""
    run = tmp_path / "run"
    overrides = ["model.name=resnet8", "train.epochs=1", "train.warmup_epochs=0"]
    fit(load_config("digits-student", overrides), run, progress=False)
    real = load_cache(run, device="cpu")
    m = [float(v) for v in real.exit_macs]
    k = real.logits["val"].shape[2]
    assert len(m) == 3
    labels = torch.tensor([0, 0, 0, 0])
    val = torch.stack([sure([1, 1, 0, 0], k), sure([0] * 4, k), sure([0] * 4, k)], dim=1)
    val[2:, 0] = 0.0  # flat at exit 1: entropy log k, the flat rows' argmax is class 0 (right)
    val[:2, 1:] = 0.0  # images 0-1 never get past exit 1 at a threshold above a sure entropy
    test = torch.stack([sure([0] * 4, k)] * 3, dim=1)
    cache = LogitsCache(
        {"val": val, "test": test}, {"val": labels, "test": labels.clone()}, real.exit_macs,
        real.weights_sha256,
    )  # fmt: skip
    save_cache(RunDir(run).logits, cache)
    x0, x_mid = m[0] / m[2], (m[0] + m[1]) / 2 / m[2]
    want = (0.5 * (x_mid - x0) + 0.75 * (1 - x_mid)) / (1 - x0)
    assert val_auc(run, EvalConfig(), "cpu") == pytest.approx(want, abs=1e-12)
    assert want < 0.9  # test's AUC is 1

    # The policy is the study's: at exit 1 image 0 is split 50/50 between two wrong classes
    # (entropy log 2, 1 - max p = 0.5), image 1 gives its right class 0.6 and four others 0.1
    # (entropy 1.23, 1 - max p = 0.4); exits 2 and 3 are sure and right. Entropy lets the wrong
    # image 0 out first, max-probability the right image 1.
    two = torch.stack([sure([1, 0], k), sure([0, 0], k), sure([0, 0], k)], dim=1)
    two[0, 0, 2] = 20.0
    two[1, 0] = torch.tensor([math.log(6.0)] + [0.0] * 4 + [-30.0] * (k - 5))
    cache.logits["val"], cache.labels["val"] = two, torch.tensor([0, 0])
    save_cache(RunDir(run).logits, cache)
    x1 = m[1] / m[2]
    entropy = (0.5 * (x_mid - x0) + 0.75 * (x1 - x_mid) + (1 - x1)) / (1 - x0)
    maxprob = (0.75 * (x_mid - x0) + (1 - x_mid)) / (1 - x0)
    assert val_auc(run, EvalConfig(), "cpu") == pytest.approx(entropy, abs=1e-12)
    assert val_auc(run, EvalConfig(policy="maxprob"), "cpu") == pytest.approx(maxprob, abs=1e-12)


@pytest.mark.slow
def test_a_two_trial_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["tune", "--preset", "quickstart", *TINY, "methods=[ce,kd,erde]", "--out", str(out)]
    assert main([*argv, "--trials", "2", "--final-seeds", "0,1,2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "kd: best validation AUC" in printed and "erde: best validation AUC" in printed
    best = json.loads((out / "best.json").read_text())
    assert set(best) == {"kd", "erde"}  # ce has nothing to tune
    assert set(best["erde"]["params"]) == set(space("erde"))
    assert 0 < best["kd"]["val_auc"] <= 1
    for method in ("kd", "erde"):
        assert states(out, method) == [TrialState.COMPLETE] * 2
        trials = sorted(p.name for p in (out / method).glob("trial-*"))
        assert trials == ["trial-0000", "trial-0001"]
    groups = json.loads((out / "final" / "comparison.json").read_text())["groups"]
    assert len(groups) == 3  # the teacher and the tuned kd and erde
    for method in ("kd", "erde"):  # seed 0 is every trial's: the best trial's run, not retrained
        trial = out / method / best[method]["run"]
        assert (out / "final" / f"{method}-s0").resolve() == trial.resolve()
        assert not (out / "final" / f"{method}-s1").is_symlink()
    for method in ("kd", "erde"):
        for seed in (0, 1, 2):
            meta = json.loads((out / "final" / f"{method}-s{seed}" / "model.json").read_text())
            assert meta["finished"] and meta["seed"] == seed
            assert meta["config"]["distill"]["alpha"] == best[method]["params"]["distill.alpha"]
    # Run again: every trial is finished, nothing is retrained.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    assert main([*argv, "--trials", "2", "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")} == stamps


def setting(params: dict) -> str:
    """A setting as erde's summary lines print it: floats to 4 significant digits."""
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


@pytest.mark.slow
def test_tune_prints_in_erdes_units_and_keeps_the_best_trial_as_its_seeds_final_run(tmp_path):
    """As a user sees it (a separate process: Optuna's handler writes to the stderr it found):
    one erde line per trial and no Optuna `[I ...]` line, the final group labelled with erde's
    tuned beta and entropy options to 4 digits, and final seed 0 (the trials' seed) trained once."""
    out = tmp_path / "study"
    argv = ["tune", "--preset", "quickstart", *TINY, "methods=[erde]", "--trials", "1"]
    argv += ["--final-seeds", "0", "--no-progress", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "erde", *argv], capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    storage = open_storage(f"sqlite:///{out / 'study.db'}")
    (trial,) = optuna.load_study(study_name=study_name(out, "erde"), storage=storage).trials
    assert set(trial.params) == set(space("erde"))
    want = setting(trial.params)
    assert "distill.beta=" in want and "distill.entropy_term=" in want
    assert "[I " not in printed and "Trial 0 finished" not in printed
    line = f"erde: trial 1 of 1 (trial-0000) finished, val AUC {100 * trial.value:.2f} % ({want})"
    assert line in printed
    assert f"erde: best validation AUC {100 * trial.value:.2f} % ({want})" in printed
    assert not re.search(r"\d\.\d{7,}", printed)  # no float printed to Optuna's 16 digits
    groups = json.loads((out / "final" / "comparison.json").read_text())["groups"]
    assert set(groups) == {"teacher (resnet8)", f"erde (resnet8), {want}"}
    assert f"| erde (resnet8), {want} | 1 |" in printed  # the comparison.md it prints
    assert printed.count("start erde resnet8") == 1  # the trial; final seed 0 is that run
    assert (out / "final" / "erde-s0").resolve() == (out / "erde" / "trial-0000").resolve()


def test_a_final_run_is_linked_to_a_trial_only_of_the_same_config(tmp_path):
    cfg = load_reproduce_config("quickstart", ["methods=[kd]"])
    change = {"distill.alpha": 0.25}
    config = trial_config(cfg, "kd", change, tmp_path / "teacher", 0)
    same, other = tmp_path / "kd" / "trial-0000", tmp_path / "kd" / "trial-0001"
    write_text(RunDir(same).config, to_yaml(config))
    write_text(RunDir(other).config, to_yaml(trial_config(cfg, "kd", change, tmp_path, 0)))
    for trial in (same, other):
        erde.study.tune._link_trial(tmp_path / "final" / trial.name, trial, config)
    assert (tmp_path / "final" / same.name).resolve() == same.resolve()
    assert not (tmp_path / "final" / other.name).exists()  # another teacher: trained instead


@pytest.mark.slow
def test_a_study_stopped_by_ctrl_c_resumes_the_interrupted_trial(tmp_path, monkeypatch):
    out = tmp_path / "study"
    cfg = load_reproduce_config("quickstart", [*TINY, "methods=[kd]"])
    report = erde.study.tune._report

    def interrupt_after_epoch_1(trial, row):
        report(trial, row)
        raise KeyboardInterrupt

    monkeypatch.setattr(erde.study.tune, "_report", interrupt_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, out, trials=2, progress=False)
    monkeypatch.undo()
    assert states(out, "kd") == [TrialState.FAIL, TrialState.WAITING]
    assert len((out / "kd" / "trial-0000" / "metrics.jsonl").read_text().splitlines()) == 1
    tune(cfg, out, trials=2, progress=False)
    assert states(out, "kd") == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    # The interrupted trial's folder was resumed (not restarted) and finished.
    assert sorted(p.name for p in (out / "kd").glob("trial-*")) == ["trial-0000", "trial-0002"]
    assert len((out / "kd" / "trial-0000" / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "kd" / "trial-0000" / "model.json").read_text())["finished"]


@pytest.mark.slow
# The test plays another worker by hand (ask, then a heartbeat), which Optuna warns is not optimize.
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_a_killed_workers_trial_is_resumed_after_the_grace_period(tmp_path):
    out = tmp_path / "study"
    cfg = load_reproduce_config("quickstart", [*TINY, "methods=[kd]"])
    tune(cfg, out, trials=1, progress=False, heartbeat_s=1)  # the teacher and one trial
    # A second worker took trial 1, trained one epoch and was killed: RUNNING, no more beats.
    storage = open_storage(f"sqlite:///{out / 'study.db'}", 1)
    study = optuna.load_study(study_name=study_name(out, "kd"), storage=storage)
    trial = study.ask()
    changes = {"distill.alpha": trial.suggest_float("distill.alpha", 0.1, 0.9)}
    changes["distill.temperature"] = trial.suggest_float("distill.temperature", 1, 8, log=True)
    trial.set_user_attr("run", "trial-0001")
    storage.record_heartbeat(trial._trial_id)
    run = out / "kd" / "trial-0001"
    fit(trial_config(cfg, "kd", changes, out / "teacher", 0), run, progress=False, stop_after=1)
    time.sleep(4)  # past the grace period of 3 beats
    tune(cfg, out, trials=2, progress=False, heartbeat_s=1)
    assert states(out, "kd", 1) == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert sorted(p.name for p in (out / "kd").glob("trial-*")) == ["trial-0000", "trial-0001"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "storage", ["sqlite:////nonexistent-erde-folder/study.db", "nosuchdb://host/db"]
)
def test_a_storage_that_cannot_be_opened_exits_2_with_one_line(tmp_path, capsys, storage):
    out = tmp_path / "study"
    argv = ["tune", "--preset", "quickstart", "--storage", storage, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot open the Optuna storage" in err[0]
    assert not out.exists()


def test_a_read_only_storage_exits_2_with_one_line_before_any_training(tmp_path):
    """A real read-only SQLite file (its permission bits obeyed, also as root): the studies are
    created first, so the refusal comes before the teacher trains."""
    db = tmp_path / "ro.db"
    open_storage(f"sqlite:///{db}")
    db.chmod(0o444)
    tmp_path.chmod(0o555)  # SQLite also needs the folder for its journal
    out = tmp_path.parent / f"{tmp_path.name}-study"
    argv = ["tune", "--preset", "quickstart", "--storage", f"sqlite:///{db}", "--out", str(out)]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "erde", *argv], capture_output=True, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"}, **as_ordinary_user(),
        )  # fmt: skip
    finally:
        tmp_path.chmod(0o755)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert f"cannot write the Optuna storage sqlite:///{db}" in err[0] and "readonly" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["study-key", "tune.yaml"]  # no teacher


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trials", "0"], "give the number of trials per method"),
        (["methods=[ce]"], "have no hyperparameters to tune"),
    ],
)
def test_bad_tune_options(tmp_path, capsys, argv, message):
    out = tmp_path / "study"
    assert main(["tune", "--preset", "quickstart", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_two_study_folders_of_one_name_on_a_shared_storage_stay_apart(tmp_path):
    """Each folder's Optuna study is its own: the second trains its trial and reports it."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    first, second = tmp_path / "a" / "study", tmp_path / "b" / "study"
    argv = ["tune", "--preset", "quickstart", *TINY, "methods=[kd]", "--trials", "1"]
    argv += ["--storage", storage, "--no-progress"]
    assert main([*argv, "--out", str(first)]) == 0
    assert main([*argv, "--out", str(second), "--teacher", str(first / "teacher")]) == 0
    for out in (first, second):
        best = json.loads((out / "best.json").read_text())["kd"]
        assert best["finished_trials"] == 1
        assert (out / "kd" / best["run"] / "model.json").is_file()
    assert study_name(first, "kd") != study_name(second, "kd")


def params(out, method):
    storage = open_storage(f"sqlite:///{out / 'study.db'}")
    study = optuna.load_study(study_name=study_name(out, method), storage=storage)
    return [t.params for t in study.get_trials(deepcopy=False)]


@pytest.mark.slow
# The test plays another worker by hand (ask, then a heartbeat), which Optuna warns is not optimize.
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_a_resumed_study_draws_new_settings_and_keeps_its_budget(tmp_path):
    """A second start does not replay the seeded sampler's draws; a third with the same budget
    trains nothing; a trial another worker is running counts against the budget."""
    out = tmp_path / "study"
    argv = ["tune", "--preset", "quickstart", *TINY, "methods=[kd]", "--out", str(out)]
    assert main([*argv, "--trials", "1", "--no-progress"]) == 0
    assert main([*argv, "--trials", "2", "--no-progress"]) == 0
    assert main([*argv, "--trials", "2", "--no-progress"]) == 0
    assert states(out, "kd") == [TrialState.COMPLETE] * 2
    first, second = params(out, "kd")
    assert set(first) == set(second) == set(space("kd")) and first != second
    # Another worker is training trial 2 (RUNNING, beating): a budget of 3 is then complete.
    storage = open_storage(f"sqlite:///{out / 'study.db'}")
    study = optuna.load_study(study_name=study_name(out, "kd"), storage=storage)
    storage.record_heartbeat(study.ask()._trial_id)
    assert main([*argv, "--trials", "3", "--no-progress"]) == 0
    assert states(out, "kd") == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING]
    assert sorted(p.name for p in (out / "kd").glob("trial-*")) == ["trial-0000", "trial-0001"]
