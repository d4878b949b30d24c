"""Every kind of run-folder file, damaged at random (truncated, bytes flipped, JSON values
replaced by other types or values, or by JSON text json.dumps never writes: deep nesting, NaN,
huge numbers, duplicate keys; `fuzz_helpers.NESTED_JSON`): the command that reads it ends with
exit status 2 and one line, or with exit 0 and the right result; never a traceback, a hang or
a wrong answer. Export files are fuzzed the same way in tests/test_fuzz_export_files.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fuzz_helpers import EXAMPLES, FAST, check, damage, mutate_json, nest_json, run
from hypothesis import given
from hypothesis import strategies as st

from erde.config.schema import load_config
from erde.deploy.early_exit_model import EarlyExitModel
from erde.errors import ErdeError
from erde.evaluation.runs import evaluate_run
from erde.train.engine import fit


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, float]:
    """A finished, evaluated run and its test accuracy at the chosen threshold."""
    run = tmp_path_factory.mktemp("fuzz") / "run"
    fit(load_config("digits-student", FAST), run, progress=False)
    return run, evaluate_run(run, device="cpu").chosen.test_accuracy


@pytest.mark.slow
@EXAMPLES
@given(data=st.data())
def test_damaged_files_are_reported_or_harmless(clean, tmp_path_factory, data):
    source, accuracy = clean
    name = data.draw(
        st.sampled_from(["model.json", "logits.safetensors", "model.safetensors", "config.yaml"])
    )
    how = data.draw(st.sampled_from(["truncate", "flip", "json"] if name == "model.json"
                                    else ["truncate", "flip"]))  # fmt: skip
    folder = tmp_path_factory.mktemp("case") / "run"
    shutil.copytree(source, folder)
    path = folder / name
    if how == "json":
        text = json.dumps(mutate_json(json.loads(path.read_text()), data.draw))
        path.write_text(text)
    else:
        path.write_bytes(damage(path.read_bytes(), how, data.draw))
    if name == "config.yaml":
        (folder / "logits.safetensors").unlink()  # the config is read when the cache is built
    code, _, err = run(["evaluate", str(folder), "--device", "cpu"])
    check(code, err)
    if code == 0 and name != "config.yaml":  # a config edit may legitimately change the data
        report = json.loads((folder / "eval" / "report.json").read_text())
        assert report["chosen"]["test_accuracy"] == pytest.approx(accuracy), err


@pytest.mark.slow
@EXAMPLES
@given(data=st.data())
def test_damaged_resume_files_are_reported_or_harmless(clean, tmp_path_factory, data):
    source, _ = clean
    folder = tmp_path_factory.mktemp("case") / "run"
    shutil.copytree(source, folder)
    path = folder / data.draw(st.sampled_from(["metrics.jsonl", "state.pt"]))
    if path.suffix == ".pt" or data.draw(st.booleans()):
        path.write_bytes(damage(path.read_bytes(), data.draw(st.sampled_from(["truncate", "flip"])),
                                data.draw))  # fmt: skip
    else:
        path.write_text(json.dumps(mutate_json(json.loads(path.read_text()), data.draw)) + "\n")
    weights = (folder / "model.safetensors").read_bytes()
    code, _, err = run(["train", "--resume", "--no-progress", "--out", str(folder)])
    check(code, err)
    assert (folder / "model.safetensors").read_bytes() == weights  # a finished run stays as it is


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.json", "eval/report.json", "metrics.jsonl"])
@EXAMPLES
@given(data=st.data())
def test_nested_json_in_run_files_is_reported_or_harmless(clean, tmp_path_factory, name, data):
    """model.json read by `erde evaluate` (the same accuracy), the report by `erde export` (the
    threshold and policy it now holds), a metrics row by `erde train --resume` (the finished run
    untouched)."""
    source, accuracy = clean
    folder = tmp_path_factory.mktemp("case") / "run"
    shutil.copytree(source, folder)
    path = folder / name
    if name == "metrics.jsonl":
        rows = path.read_text().splitlines()
        k = data.draw(st.integers(0, len(rows) - 1))
        rows[k] = nest_json(json.loads(rows[k]), data.draw)
        path.write_text("\n".join(rows) + "\n")
        weights = (folder / "model.safetensors").read_bytes()
        code, _, err = run(["train", "--resume", "--no-progress", "--out", str(folder)])
        check(code, err)
        assert (folder / "model.safetensors").read_bytes() == weights
        return
    text = nest_json(json.loads(path.read_text()), data.draw)
    path.write_text(text)
    if name == "model.json":
        code, _, err = run(["evaluate", str(folder), "--device", "cpu"])
        check(code, err)
        if code == 0:
            report = json.loads((folder / "eval" / "report.json").read_text())
            assert report["chosen"]["test_accuracy"] == pytest.approx(accuracy), err
        return
    export = folder.parent / "export"
    code, _, err = run(["export", str(folder), "--out", str(export)])
    check(code, err)
    if code == 0:  # what the edited report says, read by Python's own parser
        edited, manifest = json.loads(text), json.loads((export / "manifest.json").read_text())
        assert manifest["exits"]["threshold"] == float(edited["chosen"]["threshold"])
        assert manifest["exits"]["policy"] == edited["policy"]


@pytest.mark.slow
@EXAMPLES
@given(data=st.data())
def test_nested_json_in_a_saved_exit_rule_is_reported_or_harmless(clean, tmp_path_factory, data):
    """exit_rule.json of `save_pretrained`, read by `from_pretrained`: refused in one line, or
    the threshold and policy the edited file holds."""
    folder = tmp_path_factory.mktemp("case") / "saved"
    EarlyExitModel.from_pretrained(clean[0]).save_pretrained(folder)
    path = folder / "exit_rule.json"
    text = nest_json(json.loads(path.read_text()), data.draw)
    path.write_text(text)
    try:
        model = EarlyExitModel.from_pretrained(folder)
    except ErdeError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    edited = json.loads(text)
    assert (model.threshold, model.policy) == (float(edited["threshold"]), edited["policy"])
