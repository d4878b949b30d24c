"""Every kind of run-folder file, damaged at random (truncated, bytes flipped, JSON values
replaced by other types or values): the command that reads it ends with exit status 2 and one
line, or with exit 0 and the right result; never a traceback, a hang or a wrong answer.
Export files are fuzzed the same way in tests/test_fuzz_export_files.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fuzz_helpers import EXAMPLES, FAST, check, damage, mutate_json, run
from hypothesis import given
from hypothesis import strategies as st

from erde.config.schema import load_config
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
