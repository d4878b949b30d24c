"""`erde compare` groups runs by method, model and every config key that differs, counts seeds by
their seed and never averages two runs of one seed; `erde evaluate` writes the diagnostics.

The run folders are real (config.yaml, model.safetensors + model.json, logits.safetensors, each
written by erde's own writers) but hold no trained network: every analysis reads the logits
cache, so random logits make a run in milliseconds.
"""

import json
import logging
import zlib

import pytest
import torch
from markdown_tables import markdown_tables, seeds_text, table_rows
from safetensors.torch import save as safetensors_bytes

from erde.cli.main import main
from erde.config.schema import load_config, to_dict, to_yaml
from erde.deploy.threshold import deployment
from erde.errors import ErdeError
from erde.evaluation.cache import LogitsCache, save_cache
from erde.evaluation.compare import aggregate
from erde.evaluation.groups import experiment_keys
from erde.evaluation.render import render_comparison
from erde.evaluation.runs import compare_runs, evaluate_run, evaluation_dir
from erde.evaluation.summary import summarize
from erde.evaluation.versus import describe, versus
from erde.files import sha256_file, write_bytes, write_text
from erde.run.layout import RunDir
from erde.run.model_info import DataInfo, ModelInfo

EXIT_MACS = [1_000_000, 2_000_000, 4_000_000]
STATIC_MACS = 3_500_000
BETA = load_config("digits-student").distill.beta  # the default, which names a group too
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
        {"name": "resnet8"},
        EXIT_MACS,
        STATIC_MACS,
        DATA,
        method,
        seed,
        pairing=pairing,
        config=resolved,
        epoch=1,
        epochs=1,
        finished=True,
    )
    info.write(run.sidecar)
    logits, labels = outputs(data_seed, final)
    save_cache(run.logits, LogitsCache(logits, labels, EXIT_MACS, sha256_file(run.weights)))
    return path


def summary(
    method: str, seed: int, overrides=(), run: str | None = None, teacher=None, precision=None
):
    resolved, _ = config(method, seed, overrides, teacher or "/runs/teacher")
    logits, labels = outputs(seed)
    info = ModelInfo(
        {"name": "resnet8"}, EXIT_MACS, STATIC_MACS, DATA, method, seed, config=resolved,
        precision=precision,
    )  # fmt: skip
    cache = LogitsCache(logits, labels, EXIT_MACS, "")
    return summarize(cache, info, run or f"runs/{method}-s{seed}", budgets=())


def test_runs_group_by_the_precision_they_resolved_not_the_setting():
    runs = [
        summary("kd", 0, ["train.precision=auto"], precision="bf16"),
        summary("kd", 1, ["train.precision=bf16"], precision="bf16"),
        summary("kd", 2, ["train.precision=auto"], precision="fp32"),
    ]
    groups = aggregate(runs, max_drop=0.0).groups
    assert {label: [s.report.seed for s in g] for label, g in groups.items()} == {
        "kd (resnet8), train.precision=bf16": [0, 1],
        "kd (resnet8), train.precision=fp32": [2],
    }


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
        f"erde (resnet8), distill.beta={BETA:g}, distill.entropy_exits=all",
        "erde (resnet8), distill.beta=0.3, distill.entropy_exits=all",
        f"erde (resnet8), distill.beta={BETA:g}, distill.entropy_exits=intermediate",
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
    header = next(line for line in table.splitlines() if line.startswith("| group |"))
    assert "teacher" not in header  # no run has a reference: no teacher columns at all
    assert len(cells) == 4 and "No teacher columns: no run was evaluated against" in table
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
    assert f"| erde (resnet8), distill.beta={BETA:g} | 2 |" in md
    assert "| erde (resnet8), distill.beta=0.3 | 1 |" in md
    raw = json.loads((out / "comparison.json").read_text())
    assert raw["groups"][f"erde (resnet8), distill.beta={BETA:g}"]["seeds"] == [0, 1]
    again = write_run(tmp_path / "again" / "erde-s0", "erde", 0, data_seed=5)
    assert main(["compare", str(a), str(again), "--out", str(tmp_path / "cmp2")]) == 2
    err = capsys.readouterr().err
    assert f"{a} and {again} are both seed 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cmp2").exists()


def test_compare_versus_says_where_each_group_stands_against_the_method(tmp_path, capsys):
    teacher = write_run(tmp_path / "teacher", "teacher", 0, data_seed=99)
    kd = [write_run(tmp_path / f"kd-s{i}", "kd", i) for i in (0, 1)]
    erde = [write_run(tmp_path / f"erde-s{i}", "erde", i) for i in (0, 1)]
    out = tmp_path / "cmp"
    argv = ["compare", *map(str, kd + erde), "--reference", str(teacher), "--out", str(out)]
    assert main([*argv, "--versus", "kd"]) == 0
    text = (out / "versus.md").read_text()
    assert text in capsys.readouterr().out
    comparison = compare_runs(kd + erde, out=tmp_path / "again", reference=teacher)
    (label,) = [k for k in comparison.groups if k.startswith("erde")]
    kd_label = next(k for k in comparison.groups if k.startswith("kd"))
    expected = versus(
        [s.test_curve for s in comparison.groups[label]],
        [s.test_curve for s in comparison.groups[kd_label]],
    )
    assert f"- {describe(expected, label, 'kd')}" in text.splitlines()
    other = ["compare", *map(str, kd + erde), "--out", str(tmp_path / "c3")]
    assert main([*other, "--versus", "kd-masked"]) == 2
    err = capsys.readouterr().err
    assert "--versus kd-masked: the compared runs hold no group of method kd-masked" in err


def test_evaluate_writes_the_diagnostics_with_the_paired_teacher_exit(tmp_path):
    teacher = write_run(tmp_path / "teacher", "teacher", 0, data_seed=99, final=1.5)
    student = write_run(tmp_path / "kd-s0", "kd", 0)
    assert main(["evaluate", str(student), "--reference", str(teacher)]) == 0
    report = json.loads((student / "eval" / "report.json").read_text())
    per_exit = report["diagnostics"]["per_exit"]
    assert [x["teacher_exit"] for x in per_exit] == [1, 2, 3]  # exits numbered from 1
    for x in per_exit:
        assert x["mean_score_teacher_right"] is not None
        assert x["mean_score_teacher_wrong"] is not None
    assert 0 < report["diagnostics"]["teacher_wrong_share"] < 0.5
    assert sum(x["teacher_wrong_exit_share"] for x in per_exit) == pytest.approx(1.0)
    assert (student / "eval" / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    md = (student / "eval" / "report.md").read_text()
    assert "paired with in training (teacher exits 1, 2, 3)" in md
    rows = table_rows(md, "teacher exit")
    assert [(r["exit"], r["teacher exit"]) for r in rows] == [("1", "1"), ("2", "2"), ("3", "3")]


def test_comparison_md_states_what_comparison_json_holds(tmp_path):
    teacher = write_run(tmp_path / "teacher", "teacher", 0, data_seed=99, final=6.0)
    kd = [write_run(tmp_path / f"kd-s{s}", "kd", s) for s in (0, 1)]
    erde = [write_run(tmp_path / f"erde-s{s}", "erde", s, final=1.5) for s in (0, 1)]
    out = tmp_path / "cmp"
    compare_runs([teacher, *kd, *erde], out=out, reference=teacher, budgets=(0.1, 0.5))
    md = (out / "comparison.md").read_text()
    raw = json.loads((out / "comparison.json").read_text())
    for headers, rows in markdown_tables(md):
        assert len(set(headers)) == len(headers)  # no two columns of one name
        for cell in (c for row in rows for c in row):
            assert cell.count("n/a") == cell.count("n/a: "), cell  # every n/a says why
    rows = table_rows(md, "seeds")
    keep_ref = "keep reference val accuracy: MACs reduction at test accuracy"
    assert list(rows[0])[4] == keep_ref
    assert "budget 10% of full MACs: test accuracy (%)" not in rows[0]  # below every first exit
    ref = raw["reference"]
    assert f"test accuracy {100 * ref['test_accuracy']:.2f} %, 3.50 M MACs per image" in md
    cells = set()
    for row in rows:
        group = raw["groups"][row["group"]]["summaries"]
        assert row["seeds"] == str(len(group))
        per_exit = [
            seeds_text([100 * r["per_exit_accuracy"]["test"][i] for r in group]) for i in range(3)
        ]
        assert row["test accuracy per exit (%)"] == " / ".join(per_exit)
        points = [r["at_reference_accuracy"] for r in group]
        missed = sum(not p["reached"] for p in points)
        if missed:  # no operating point, so no accuracy "there"
            expected = f"n/a: not reached on val ({missed} of {len(points)} seeds)"
        else:
            times = seeds_text([p["reduction_vs_reference"] for p in points], "x")
            expected = f"{times} at {seeds_text([100 * p['test_accuracy'] for p in points], ' %')}"
        assert row[keep_ref] == expected
        cells.add(expected.startswith("n/a"))
        budget = [100 * r["at_budget_fraction"]["0.5"]["test_accuracy"] for r in group]
        assert row["budget 50% of full MACs: test accuracy (%)"] == seeds_text(budget)
    assert cells == {True, False}  # both kinds of cell were checked


def test_evaluate_with_another_criterion_keeps_the_deployed_threshold(tmp_path, capsys):
    teacher = write_run(tmp_path / "teacher", "teacher", 0, data_seed=99, final=1.5)
    run = write_run(tmp_path / "kd-s0", "kd", 0)
    deployed = run / "eval" / "report.json"
    assert main(["evaluate", str(run), "--reference", str(teacher)]) == 0
    first = deployed.read_bytes()
    chosen_by = json.loads(first)["chosen_by"]
    assert chosen_by == "keep teacher resnet8 (final exit) val accuracy - 0 pt"
    files = sorted(p.name for p in (run / "eval").iterdir())
    capsys.readouterr()

    # Without --reference the rule is another: refused, nothing written.
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("erde evaluate: error: ")
    assert f"chosen by {chosen_by} (entropy policy)" in err and "--replace-export" in err
    assert "keep the run's own final exit val accuracy - 0 pt" in err
    # Nor into RUN/eval by name.
    assert main(["evaluate", str(run), "--out", str(run / "eval")]) == 2
    assert deployed.read_bytes() == first
    assert sorted(p.name for p in (run / "eval").iterdir()) == files

    # The same criterion again may rewrite it; another one goes to its own folder.
    assert main(["evaluate", str(run), "--reference", str(teacher)]) == 0
    assert main(["evaluate", str(run), "--budget", "0.5"]) == 0
    assert (run / "eval-budget0.5" / "report.json").is_file()
    assert deployed.read_bytes() == first
    assert deployment(run).threshold == json.loads(first)["chosen"]["threshold"]

    # Asked for, the other criterion becomes the deployed one.
    report = evaluate_run(run, budget=0.5, replace_export=True)
    assert json.loads(deployed.read_text())["chosen_by"] == "budget 50% of full MACs"
    point = deployment(run)
    assert point.threshold == report.chosen.threshold
    assert report.chosen.criterion in point.threshold_source  # the budget's, from RUN/eval


def test_replace_export_writes_the_run_eval_folder_only(tmp_path):
    run = write_run(tmp_path / "kd-s0", "kd", 0)
    assert evaluation_dir(run, budget=0.5).path == run / "eval-budget0.5"
    assert evaluation_dir(run, budget=0.5, replace_export=True).path == run / "eval"
    assert evaluation_dir(run, run / "eval", replace_export=True).path == run / "eval"
    with pytest.raises(ErdeError, match=r"--replace-export writes .*drop one of the two"):
        evaluation_dir(run, tmp_path / "elsewhere", replace_export=True)


def test_a_study_keeps_a_deployed_threshold_of_another_criterion(tmp_path, caplog):
    teacher = write_run(tmp_path / "teacher", "teacher", 0, data_seed=99, final=1.5)
    run = write_run(tmp_path / "kd-s0", "kd", 0)
    evaluate_run(run, reference=teacher)
    deployed = (run / "eval" / "report.json").read_bytes()
    (run / "eval" / "tradeoff.png").unlink()
    with caplog.at_level(logging.WARNING, logger="erde"):
        compare_runs([run], out=tmp_path / "own", evaluate_each=[run])  # no reference: own rule
    assert (tmp_path / "own" / "comparison.md").is_file()  # the study still ends
    assert (run / "eval" / "report.json").read_bytes() == deployed
    assert not (run / "eval" / "tradeoff.png").exists()  # nothing of the eval folder rewritten
    assert f"{run / 'eval'} kept" in caplog.text and "--replace-export" in caplog.text
    compare_runs([run], out=tmp_path / "same", reference=teacher, evaluate_each=[run])
    assert (run / "eval" / "tradeoff.png").is_file()  # the same criterion is rewritten
