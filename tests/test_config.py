"""The config schema's table of choices and ranges, the method table, and comma lists."""

import argparse
import math
import re

import pytest
import yaml

from erde.config.comma_list import comma_list_type, parse_comma_list
from erde.config.methods import (
    METHOD_TABLE,
    PAPER_METHODS,
    methods,
    static_methods,
    student_methods,
    teacher_methods,
)
from erde.config.schema import (
    ReproduceConfig,
    check_value,
    load_config,
    load_reproduce_config,
    records,
    to_yaml,
)
from erde.distill.losses import make_loss, pair_exits
from erde.errors import ErdeError

# ---------------------------------------------------------------- the method table


@pytest.mark.parametrize("name", methods())
def test_the_method_table_decides_teacher_and_terms(name):
    method = METHOD_TABLE[name]
    teacher = ["distill.teacher=runs/t"] if method.needs_teacher else []
    plain = [] if method.early_exits else ["model.exits=[]"]
    cfg = load_config("digits-student", [f"distill.method={name}", *teacher, *plain])
    assert cfg.distill.method == name
    other = [] if method.needs_teacher else ["distill.teacher=runs/t"]
    with pytest.raises(ErdeError, match="needs a teacher" if teacher else "uses no teacher"):
        load_config("digits-student", [f"distill.method={name}", *other, *plain])
    loss = make_loss(name, alpha=0.3, beta=2.0, num_exits=2)
    assert loss.needs_teacher == method.needs_teacher
    assert loss.alpha == (0.3 if method.distils else 1.0)
    assert loss.beta == (2.0 if method.entropy else 0.0)


def test_the_lists_derive_from_the_table():
    assert methods() == ("teacher", "ce", "kd", "kd-masked", "erde", "self-kd", "static")
    assert student_methods() == ("ce", "kd", "kd-masked", "erde", "self-kd", "static")
    assert teacher_methods() == ("kd", "kd-masked", "erde", "static")
    assert static_methods() == ("static",)
    assert records()["distill.method"].choices == methods()
    assert ReproduceConfig().methods == list(PAPER_METHODS) == ["ce", "kd", "kd-masked", "erde"]
    cfg = load_reproduce_config("quickstart", ["methods=[ce,erde]"])
    assert cfg.methods == ["ce", "erde"]
    with pytest.raises(ErdeError, match="methods contains 'teacher'; students use ce, kd, "):
        load_reproduce_config("quickstart", ["methods=[teacher]"])


def test_config_yaml_keeps_plain_strings():
    cfg = load_config("digits-student", ["distill.method=kd-masked", "distill.teacher=t"])
    written = yaml.safe_load(to_yaml(cfg))["distill"]
    assert written["method"] == "kd-masked" and written["entropy_term"] == "uniform-ce"
    assert type(cfg.distill.method) is str


# ---------------------------------------------------------------- choices and ranges


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("distill.method", "magic", "distill.method='magic' is not allowed; choose one of teacher"),
        ("distill.alpha", 2.0, "distill.alpha=2.0 must lie in [0, 1]"),
        ("distill.alpha", math.nan, "distill.alpha=nan must be a finite number in [0, 1]"),
        ("distill.beta", math.inf, "distill.beta=inf must be a finite number >= 0"),
        ("distill.temperature", 0.0, "distill.temperature=0.0 must be > 0"),
        ("train.epochs", 0, "train.epochs=0 must be > 0"),
        ("data.val_size", -1.0, "data.val_size=-1.0 must be >= 0"),
        ("distill.exit_weights", [1.0, -1.0], "exit_weights=[1.0, -1.0] must be weights >= 0"),
        ("train.milestones", [0.5, 2.0], "must be fractions of the run in (0, 1]"),
        ("evaluate.budgets", [0.0], "evaluate.budgets=[0.0] must be fractions of the student's"),
    ],
)
def test_check_value_names_the_key_and_the_rule(key, value, message):
    with pytest.raises(ErdeError) as info:
        check_value(key, value)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_check_value_accepts_the_edges():
    for key, value in [
        ("distill.alpha", 0.0),
        ("distill.alpha", 1.0),
        ("distill.beta", 0.0),
        ("distill.exit_weights", None),
        ("train.milestones", [1.0]),
        ("distill.entropy_exits", "intermediate"),
    ]:
        check_value(key, value)
    with pytest.raises(KeyError):
        check_value("train.no_such_key", 1)


def test_the_loss_refuses_what_the_config_refuses_in_the_same_words():
    with pytest.raises(ErdeError) as from_config:
        load_config("digits-student", ["distill.alpha=2"])
    with pytest.raises(ErdeError) as from_loss:
        make_loss("ce", alpha=2.0, num_exits=1)
    assert str(from_loss.value) == str(from_config.value)
    with pytest.raises(ErdeError, match=r"distill\.pairing='nearest' is not allowed"):
        pair_exits([1.0], [1.0], "nearest")
    with pytest.raises(ErdeError, match=r"distill\.entropy_term='max' is not allowed"):
        make_loss("erde", entropy_term="max", num_exits=1)


# ---------------------------------------------------------------- comma lists


def test_comma_lists():
    assert parse_comma_list("0, 1,2", int) == [0, 1, 2]
    assert parse_comma_list(" 0.5,1e-3 ", float) == [0.5, 0.001]
    for text in ("0,x", "", "3,,6", "1,", "1.5"):
        with pytest.raises(ValueError, match=re.escape(f"{text!r} is not a comma list of int")):
            parse_comma_list(text, int)
    with pytest.raises(argparse.ArgumentTypeError, match="'a' is not a comma list of numbers"):
        comma_list_type(float)("a")


DEEP = "[" * 500 + "]" * 500


@pytest.mark.parametrize(
    "override", [f"train.lr={DEEP}", f"model.options.x={DEEP}", f"data.mean={DEEP}"]
)
def test_a_deeply_nested_override_is_one_short_message(override):
    with pytest.raises(ErdeError, match="nests lists or mappings deeper than erde reads") as err:
        load_config("digits-student", [override])
    assert len(str(err.value)) < 400 and "\n" not in str(err.value)


def test_a_long_value_is_cut_in_its_middle(tmp_path, capsys):
    from erde.cli.main import main

    value = "x" * 20000
    with pytest.raises(ErdeError) as err:
        load_config("digits-student", [f"train.lr={value}"])
    assert "[20,011 characters in all]" in str(err.value) and len(str(err.value)) < 600
    assert "could not be converted to Float" in str(err.value)  # the reason survives the cut
    # Messages made elsewhere are cut by the command line: 20 KB of one word in an unknown name.
    assert main(["train", "digits-student", f"model.name={value}", "--out", str(tmp_path)]) == 2
    line = capsys.readouterr().err
    assert len(line.splitlines()) == 1 and len(line) < 1000, line[:300]
    assert "[20,003 characters in all]" in line and "choose one of" in line
