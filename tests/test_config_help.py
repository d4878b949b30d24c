"""`erde config`: every key with its type, default, rule and help, for train and reproduce."""

import pytest

from erde.cli.main import main
from erde.config.help import show_config
from erde.config.schema import Config, ReproduceConfig, records


@pytest.mark.parametrize("schema", [Config, ReproduceConfig])
def test_every_schema_key_has_a_help_line(schema):
    missing = [k for k, record in records(schema).items() if not record.help.strip()]
    assert missing == []


def test_train_config_lines_carry_type_default_rule_and_help():
    out = show_config("digits-teacher", ["train.epochs=7"])
    line = next(s for s in out.splitlines() if s.strip().startswith("epochs:"))
    assert line == "  epochs: 7  # int, default 30, > 0: passes over the training split"
    schedule = next(s for s in out.splitlines() if s.strip().startswith("schedule:"))
    assert "one of cosine, multistep, constant" in schedule


def test_reproduce_presets_are_shown_by_name():
    out = show_config("quickstart", ["student.train.epochs=5"])
    assert "teacher:\n  model:\n    name: resnet20" in out
    assert "methods: [ce, kd, kd-masked, erde]  # list[str]" in out
    assert "    epochs: 5  # int, default 30" in out


def test_conflicting_override_names_the_stage_and_the_key(capsys):
    code = main(["config", "quickstart", "student.train.epochs=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "the student stage" in err
    assert "student.train.warmup_epochs" in err and "student.train.epochs" in err
