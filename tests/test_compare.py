"""`erde compare` groups runs by method, model and every config key that differs, counts seeds by
their seed and never averages two runs of one seed; `erde evaluate` writes the diagnostics.

The run folders are real (config.yaml, model.safetensors + model.json, logits.safetensors, each
written by erde's own writers) but hold no trained network: every analysis reads the logits
cache, so random logits make a run in milliseconds.
"""

import json
import zlib

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from erde.cli import main
from erde.config import load_config, to_dict, to_yaml
from erde.errors import ErdeError
from erde.evaluation.cache import LogitsCache, save_cache
from erde.evaluation.compare import aggregate
from erde.evaluation.groups import experiment_keys
from erde.evaluation.render import render_comparison
from erde.evaluation.summary import summarize
from erde.files import sha256_file, write_bytes, write_text
from erde.model_info import DataInfo, ModelInfo
from erde.rundir import RunDir

EXIT_MACS = [10, 20, 40]
DATA = DataInfo("digits", list("abcd"), [0.5], [0.25], 8, 1)


def outputs(seed: int, final: float = 4.0) -> tuple[dict, dict]:
    """Per-exit logits (3 exits, 4 classes) of val and test, later exits surer (the last one by
    a margin of `final`); `seed` varies them."""
    g = torch.Generator().manual_seed(seed)
    logits, labels = {}, {}
    for split in ("val", "test"):
        labels[split] = torch.arange(80) % 4  # the same images for every run
        x = torch.randn(80, 3, 4, generator=g)
        x[torch.arange(80), :, labels[split]] += torch.tensor([1.0, 2.0, final])
        logits[split] = x
    return logits, labels


def config(method: str, seed: int, overrides=(), teacher: str = "/runs/teacher") -> dict:
    extra = [] if method in ("teacher", "ce") else [f"distill.teacher={teacher}"]
    cfg = load_config(
        "digits-student", [f"distill.method={method}", f"train.seed={seed}", *extra, *overrides]
    )
    return to_dict(cfg), to_yaml(cfg)


def write_run(
    path, method: str, seed: int, overrides=(), *, data_seed=None, teacher=None, final=4.0
):
    """A run folder as `erde train` and `erde evaluate` leave it, around random logits."""
    run = RunDir(path)
    resolved, text = config(method, seed, overrides, teacher or "/runs/teacher")
    write_text(run.config, text)
    if data_seed is None:  # other logits (and weights) for every run
        data_seed = zlib.crc32(f"{method} {seed} {overrides}".encode()) % 1000
    write_bytes(run.weights, safetensors_bytes({"w": torch.tensor([float(data_seed)])}))
    pairing = None if method in ("teacher", "ce") else [0, 1, 2]
    info = ModelInfo(
        {"name": "resnet8"}, EXIT_MACS, 35, DATA, method, seed, pairing=pairing, config=resolved
    )
    info.write(run.sidecar)
    logits, labels = outputs(data_seed, final)
    save_cache(run.logits, LogitsCache(logits, labels, EXIT_MACS, sha256_file(run.weights)))
    return path


def summary(method: str, seed: int, overrides=(), run: str | None = None, teacher=None):
    resolved, _ = config(method, seed, overrides, teacher or "/runs/teacher")
    logits, labels = outputs(seed)
    info = ModelInfo({"name": "resnet8"}, EXIT_MACS, 35, DATA, method, seed, config=resolved)
    cache = LogitsCache(logits, labels, EXIT_MACS, "")
    return summarize(cache, info, run or f"runs/{method}-s{seed}", budgets=())


def test_runs_that_differ_in_a_loss_option_are_separate_groups():
    runs = [
        summary("erde", 0),
        summary("erde", 1),
        summary("erde", 0, ["distill.beta=0.3"]),
        summary("erde", 0, ["distill.entropy_exits=intermediate"]),
        summary("kd", 0),
        summary("kd", 1),
    ]
    groups = aggregate(runs, max_drop=0.0).groups
    assert list(groups) == [
        "erde (resnet8), distill.beta=1, distill.entropy_exits=all",
        "erde (resnet8), distill.beta=0.3, distill.entropy_exits=all",
        "erde (resnet8), distill.beta=1, distill.entropy_exits=intermediate",
        "kd (resnet8)",  # beta and the entropy options are not kd's: no label, no split
    ]
    assert [len(g) for g in groups.values()] == [2, 1, 1, 2]


def test_keys_that_never_make_another_experiment_do_not_split_groups():
    runs = [
        summary("kd", 0, ["train.eval_batch_size=7", "data.root=/a", "train.device=cpu"]),
        summary("kd", 1, ["train.checkpoint_every=3", "train.tensorboard=true"], teacher="/b/t"),
    ]
    assert list(aggregate(runs, 0.0).groups) == ["kd (resnet8)"]
    assert "train.seed" not in experiment_keys(runs[0].config, "kd")
    assert "distill.alpha" in experiment_keys(runs[0].config, "kd")
    assert "distill.alpha" not in experiment_keys(runs[0].config, "ce")


def test_two_runs_of_one_seed_in_one_group_are_refused():
    runs = [summary("kd", 0, run="runs/a/kd-s0"), summary("kd", 0, run="runs/b/kd-s0")]
    with pytest.raises(ErdeError, match="runs/a/kd-s0 and runs/b/kd-s0 are both seed 0"):
        aggregate(runs, 0.0)
    other_teacher = [summary("kd", 1, run="x"), summary("kd", 1, run="y", teacher="/other")]
    with pytest.raises(ErdeError, match=r"differ only in distill\.teacher\)"):
        aggregate(other_teacher, 0.0)


def test_runs_without_a_recorded_config_group_by_method_and_model():
    runs = [summary("kd", 0), summary("kd", 1, ["distill.alpha=0.9"])]
    for s in runs:
        s.config.clear()  # written before configs were recorded
    assert list(aggregate(runs, 0.0).groups) == ["kd (resnet8)"]


def test_comparison_shows_diagnostics_per_group_as_mean_and_std():
    runs = [summary("erde", 0), summary("erde", 1), summary("kd", 0)]
    md = render_comparison(aggregate(runs, 0.0))
    table = md.split("## Diagnostics (test split)")[1]
    row = next(line for line in table.splitlines() if line.startswith("| erde (resnet8) |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].count("±") == 3 and cells[1].count(" / ") == 2  # ECE: 3 exits, 2 seeds
    assert cells[3] == "n/a / n/a / n/a"  # teacher entries: no reference run given
    kd = next(line for line in table.splitlines() if line.startswith("| kd (resnet8) |"))
    assert "±" not in kd  # one seed: no spread


def test_compare_cli_refuses_a_repeated_seed_and_groups_a_grid(tmp_path, capsys):
    teacher = write_run(tmp_path / "teacher", "teacher", 0, data_seed=99)
    a = write_run(tmp_path / "erde-s0", "erde", 0)
    b = write_run(tmp_path / "erde-beta0.3-s0", "erde", 0, ["distill.beta=0.3"])
    c = write_run(tmp_path / "erde-s1", "erde", 1)
    out = tmp_path / "cmp"
    args = ["compare", str(a), str(b), str(c), "--reference", str(teacher), "--out", str(out)]
    assert main(args) == 0
    md = (out / "comparison.md").read_text()
    assert "| erde (resnet8), distill.beta=1 | 2 |" in md
    assert "| erde (resnet8), distill.beta=0.3 | 1 |" in md
    raw = json.loads((out / "comparison.json").read_text())
    assert raw["groups"]["erde (resnet8), distill.beta=1"]["seeds"] == [0, 1]
    again = write_run(tmp_path / "again" / "erde-s0", "erde", 0, data_seed=5)
    assert main(["compare", str(a), str(again), "--out", str(tmp_path / "cmp2")]) == 2
    err = capsys.readouterr().err
    assert f"{a} and {again} are both seed 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cmp2").exists()


def test_evaluate_writes_the_diagnostics_with_the_paired_teacher_exit(tmp_path):
    teacher = write_run(tmp_path / "teacher", "teacher", 0, data_seed=99, final=1.5)
    student = write_run(tmp_path / "kd-s0", "kd", 0)
    assert main(["evaluate", str(student), "--reference", str(teacher)]) == 0
    report = json.loads((student / "eval" / "report.json").read_text())
    per_exit = report["diagnostics"]["per_exit"]
    assert [x["teacher_exit"] for x in per_exit] == [0, 1, 2]
    for x in per_exit:
        assert x["mean_score_teacher_right"] is not None
        assert x["mean_score_teacher_wrong"] is not None
    assert 0 < report["diagnostics"]["teacher_wrong_share"] < 0.5
    assert sum(x["teacher_wrong_exit_share"] for x in per_exit) == pytest.approx(1.0)
    assert (student / "eval" / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    md = (student / "eval" / "report.md").read_text()
    assert "paired with in training (teacher exits 1, 2, 3)" in md
