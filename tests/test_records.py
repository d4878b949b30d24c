"""One record per config key: every field has one, and every consumer follows it.

Each consumer takes the records as an argument, so a test flips one record in a copy of the
table and sees the consumer change, with no mock and no edit of the schema.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest

from erde.config.help import annotated_yaml
from erde.config.method_keys import applies
from erde.config.methods import methods
from erde.config.records import NON_NEGATIVE, Range, Record, key, walk_records
from erde.config.schema import Config, ReproduceConfig, load_reproduce_config, records
from erde.errors import ErdeError
from erde.evaluation.groups import check_seeds, experiment_keys
from erde.evaluation.policies import get_policy, policy_names
from erde.study.grid import check_key, expand
from erde.study.tune import space


def _leaf_fields(schema: type, prefix: str = "") -> list[str]:
    """Every leaf field of a config dataclass, walked here independently of the records."""
    hints = typing.get_type_hints(schema)
    keys = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


@pytest.mark.parametrize("schema", [Config, ReproduceConfig])
def test_every_field_has_a_record_with_help(schema):
    table = records(schema)
    assert list(table) == _leaf_fields(schema)
    assert all(isinstance(r, Record) and r.help.strip() for r in table.values())


def test_a_field_without_a_record_is_refused():
    @dataclasses.dataclass
    class Bare:
        documented: int = dataclasses.field(default=1, metadata=key("a key with a record"))
        undocumented: int = 2

    with pytest.raises(TypeError, match="config key undocumented has no record"):
        walk_records(Bare)
    with pytest.raises(ValueError, match="help line"):
        key("  ")


def test_records_are_frozen_and_hold_one_rule():
    record = records()["train.lr"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.help = "changed"  # type: ignore[misc]
    with pytest.raises(ValueError, match="not both"):
        Record("both", choices=("a",), range=NON_NEGATIVE)


def test_the_policy_key_names_the_built_in_policies():
    """The config cannot see the registry (a layer above it): its help names the built-ins and
    `erde.study.reproduce.check_policy` checks the name before any run trains."""
    record = records()["evaluate.policy"]
    assert record.choices is None
    builtin = [name for name in policy_names() if get_policy(name).builtin]  # not a test's plugin
    assert builtin and all(name in record.help for name in builtin)


def test_the_stages_share_the_train_records():
    table = records()
    assert table["student.train.lr"] is table["teacher.train.lr"] is table["train.lr"]


def _flipped(name: str, **changes) -> dict[str, Record]:
    table = records()
    table[name] = dataclasses.replace(table[name], **changes)
    return table


def test_help_follows_the_record():
    cfg = Config()
    table = _flipped("train.epochs", help="laps", range=Range(2))
    line = next(s for s in annotated_yaml(cfg, table=table).splitlines() if "epochs:" in s)
    assert line == "  epochs: 30  # int, default 30, >= 2: laps"


def test_grid_refusal_follows_the_record():
    check_key("distill.beta")
    with pytest.raises(ErdeError, match=r"grid key distill\.beta cannot be gridded: fixed here"):
        check_key("distill.beta", _flipped("distill.beta", ungridded="fixed here"))
    check_key("distill.teacher_cache", _flipped("distill.teacher_cache", ungridded=""))
    with pytest.raises(ErdeError, match="it does not change what a run learns"):
        check_key("distill.teacher_cache")


def test_grouping_follows_the_record():
    config = {"train": {"seed": 0, "lr": 0.1}, "distill": {"beta": 0.1}}
    assert set(experiment_keys(config, "erde")) == {"train.lr", "distill.beta"}
    table = _flipped("train.lr", experiment=False)
    table = {**table, "train.seed": dataclasses.replace(table["train.seed"], experiment=True)}
    assert set(experiment_keys(config, "erde", table)) == {"train.seed", "distill.beta"}
    assert "distill.beta" not in experiment_keys(config, "kd")
    assert "distill.beta" in experiment_keys(config, "kd", _flipped("distill.beta", term=None))
    other = {"train": {"seed": 0, "lr": 0.2}, "distill": {"beta": 0.1}}
    with pytest.raises(ErdeError, match=r"\(they differ only in train\.lr\)"):
        check_seeds("erde (resnet8)", [("a", 0, config), ("b", 0, other)], table)


def test_method_keys_follow_the_record():
    def reading(key):
        return tuple(m for m in methods() if applies(key, m))

    assert reading("distill.beta") == ("erde",)
    assert reading("distill.alpha") == ("kd", "kd-masked", "erde", "self-kd", "static")
    assert reading("distill.pairing") == ("kd", "kd-masked", "erde", "static")
    assert not applies("distill.alpha", "ce")
    assert applies("distill.alpha", "ce", _flipped("distill.alpha", term=None))
    assert applies("student.model.options.width", "ce")  # read off model.options
    assert applies("no.such.key", "ce")


def test_the_tuner_follows_the_record():
    table = records()
    searched = {k: r.search for k, r in table.items() if r.search is not None}
    assert set(searched) == {
        "distill.alpha",
        "distill.temperature",
        "distill.beta",
        "distill.entropy_term",
        "distill.entropy_exits",
    }
    for name, search in searched.items():
        if search.low is None:  # every allowed value
            assert table[name].choices, name
        else:
            assert table[name].range is not None and table[name].range.holds(search.low), name
            assert table[name].range.holds(search.high), name
    assert "distill.beta" in space("erde")
    assert "distill.beta" not in space("erde", _flipped("distill.beta", ungridded="fixed"))
    assert space("kd", _flipped("distill.entropy_term", term="kd")) == [
        "distill.alpha",
        "distill.temperature",
        "distill.entropy_term",
    ]


def test_stage_messages_name_the_reproduce_key():
    with pytest.raises(ErdeError) as info:
        load_reproduce_config("quickstart", ["teacher.model.options.width=.nan"])
    assert str(info.value) == (
        "the teacher stage: teacher.model.options.width=nan must be a finite number"
    )


def test_a_grid_message_names_the_student_key():
    cfg = load_reproduce_config(
        "quickstart", ["methods=[kd]"], grid={"student.train.warmup_epochs": ["100"]}
    )
    with pytest.raises(ErdeError, match=r"^student\.train\.warmup_epochs=100\.0 must be below "):
        expand(cfg)
