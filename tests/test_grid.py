"""Ablation grids and shards of `erde reproduce`: expansion, typing, names, slices, locks."""

import json
import re

import pytest

from erde.cli.main import main
from erde.config.schema import load_reproduce_config, to_yaml
from erde.errors import ErdeError
from erde.logs import log_to_stdout
from erde.run.lock import run_lock
from erde.study.grid import expand, parse_grid_options
from erde.study.reproduce import check_study, train_students
from erde.study.shard import Shard, parse_shard

# `main` logs to the sys.stdout of its first call: bind it now, not to a test's capsys stream,
# which is closed once that test ends.
log_to_stdout()

TINY = [
    "teacher.model.name=resnet8",
    "teacher.train.epochs=1",
    "student.train.epochs=1",
    "teacher.train.warmup_epochs=0",
    "student.train.warmup_epochs=0",
    "methods=[kd,erde]",
]


def grid_config(grid, methods="[kd,erde]"):
    return load_reproduce_config("quickstart", [f"methods={methods}"], grid=grid)


def test_a_key_expands_only_the_methods_whose_loss_reads_it():
    cfg = grid_config(
        {"distill.beta": ["0.3", "0.1", "3"], "distill.entropy_exits": ["all", "intermediate"]},
        "[ce,kd,erde]",
    )
    names = [v.name for v in expand(cfg)]
    # beta=0.1 and entropy_exits=all are the base config: those runs keep their plain names.
    assert names == [
        "ce",
        "kd",
        "erde-beta0.3",
        "erde-beta0.3-entropy_exits-intermediate",
        "erde",
        "erde-entropy_exits-intermediate",
        "erde-beta3",
        "erde-beta3-entropy_exits-intermediate",
    ]
    by_name = {v.name: v for v in expand(cfg)}
    assert by_name["erde-beta3"].config.distill.beta == 3.0
    assert by_name["erde-beta3"].changes == (("distill.beta", 3.0),)


def test_values_that_print_alike_name_distinct_runs():
    cfg = grid_config({"distill.beta": ["0.1234561", "0.1234562", "2"]}, "[erde]")
    by_name = {v.name: v.config.distill.beta for v in expand(cfg)}
    assert by_name == {"erde-beta0.1234561": 0.1234561, "erde-beta0.1234562": 0.1234562,
                       "erde-beta2": 2.0}  # fmt: skip


@pytest.mark.parametrize(
    "value", ["../../../w.safetensors", "torchvision/resnet18", "..", "/abs/w.safetensors"]
)
def test_a_text_value_names_one_folder_inside_the_study(tmp_path, value):
    cfg = grid_config({"student.model.pretrained": [value, "other"]}, "[ce]")
    names = [v.name for v in expand(cfg)]
    assert len(set(names)) == 2
    for name in names:
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()
        assert "/" not in name and not name.startswith(".")


def test_student_keys_apply_to_every_method_and_values_are_typed():
    cfg = grid_config({"student.train.lr": ["0.05", "0.050", "0.2"]}, "[ce,kd]")
    variants = expand(cfg)
    assert [v.name for v in variants] == ["ce-lr0.05", "ce-lr0.2", "kd-lr0.05", "kd-lr0.2"]
    assert {type(v.config.student.train.lr) for v in variants} == {float}


def test_the_preset_grid_and_the_command_line_grid_merge():
    cfg = load_reproduce_config(
        "quickstart", ["methods=[erde]", "grid={distill.beta: [0.5, 2]}"], grid=None
    )
    assert [v.name for v in expand(cfg)] == ["erde-beta0.5", "erde-beta2"]
    cfg = load_reproduce_config(
        "quickstart", ["methods=[erde]", "grid={distill.beta: [0.5, 2]}"], {"distill.beta": ["3"]}
    )
    assert [v.name for v in expand(cfg)] == ["erde-beta3"]


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"distill.beta": ["0.1", "abc"]}, "could not be converted to Float"),
        ({"distill.beta": ["-1"]}, "distill.beta=-1.0 must be >= 0"),
        ({"distill.entropy_exits": ["some"]}, "distill.entropy_exits='some' is not allowed"),
        ({"distill.betta": ["1"]}, "Key 'betta' not in 'DistillConfig'"),
        ({"teacher.train.lr": ["0.1"]}, "only student.* and distill.* keys can be gridded"),
        ({"data.val_size": ["0.1"]}, "only student.* and distill.* keys can be gridded"),
        ({"student.train.milestones": ["0.5"]}, "holds a list"),
        ({"distill.method": ["kd"]}, "list the methods in methods=[...]"),
    ],
)
def test_bad_grids_are_refused(grid, message):
    with pytest.raises(ErdeError, match=re.escape(message)):
        expand(grid_config(grid))


@pytest.mark.parametrize("text", ["distill.beta", "distill.beta=", "distill.beta=1,,2", "=1"])
def test_grid_options_need_key_and_values(text):
    with pytest.raises(ErdeError, match="is not of the form KEY=V1,V2"):
        parse_grid_options([text])


def test_a_grid_key_given_twice_is_refused():
    with pytest.raises(ErdeError, match="given twice"):
        parse_grid_options(["distill.beta=1", "distill.beta=2"])


@pytest.mark.parametrize("text", ["3/2", "0/0", "0/2", "1/0", "a/b", "1", "-1/2"])
def test_bad_shards_are_refused(text):
    with pytest.raises(ErdeError, match=r"give I/N with 1 <= I <= N"):
        parse_shard(text)


def test_shards_split_the_runs_round_robin_and_cover_them_once():
    runs = list(range(7))
    slices = [parse_shard(f"{i}/3").pick(runs) for i in (1, 2, 3)]
    assert slices == [[0, 3, 6], [1, 4], [2, 5]]
    assert Shard(5, 9).pick(runs) == [4]


def test_a_study_folder_of_another_study_is_refused(tmp_path):
    recorded = tmp_path / "reproduce.yaml"
    recorded.write_text(to_yaml(grid_config({"distill.beta": ["1"]})))
    check_study(recorded, grid_config({"distill.beta": ["1", "3"]}, "[ce,kd,erde]"))  # more runs
    other = load_reproduce_config("quickstart", ["methods=[kd,erde]", "student.train.epochs=3"])
    with pytest.raises(ErdeError, match=r"holds another study.*student\.train\.epochs=15 where"):
        check_study(recorded, other)


@pytest.mark.slow
def test_shards_train_their_slices_and_the_last_one_compares(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["reproduce", "--preset", "quickstart", *TINY, "--out", str(out), "--no-progress"]
    grid = ["--grid", "distill.beta=0.5,0.1"]  # 0.1: the default, the plain `erde` run
    assert main([*argv, *grid, "--shard", "2/2"]) == 0
    assert "waits for the other runs" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name[0] != ".") == [
        "erde-beta0.5-s0",
        "teacher",
    ]
    assert not (out / "comparison.md").exists()
    assert main([*argv, *grid, "--shard", "1/2"]) == 0
    for run in ("kd-s0", "erde-s0", "erde-beta0.5-s0", "teacher"):
        assert json.loads((out / run / "model.json").read_text())["finished"]
    groups = json.loads((out / "comparison.json").read_text())["groups"]
    assert len(groups) == 4  # teacher, kd and erde at two values of beta
    # Another study's settings in the same folder: refused, nothing touched.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main([*argv[:-3], "student.train.epochs=2", "--out", str(out)]) == 2
    assert "holds another study" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_run_another_process_holds_is_skipped(tmp_path):
    from erde.config.schema import stage_config

    cfg = load_reproduce_config("quickstart", TINY)
    runs = [
        (stage_config(cfg, "student", seed=0, method="ce"), tmp_path / f"ce-{i}") for i in (0, 1)
    ]
    with run_lock(runs[0][1], wait=False) as held:  # as another shard would
        assert held
        train_students(runs, jobs=1, progress=False)
    assert not runs[0][1].exists()
    assert json.loads((runs[1][1] / "model.json").read_text())["finished"]
