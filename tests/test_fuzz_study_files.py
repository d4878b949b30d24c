"""The files `erde reproduce` and `erde tune` read back from a study folder when the same command
runs again (a rerun or a resume), damaged at random: reproduce.yaml (its grid section too) and
comparison.json; tune.yaml, the study-key, the Optuna SQLite storage and best.json. Truncated,
bits flipped, or YAML/JSON values replaced by other types or values. The rerun ends with exit
status 2 and one line, or with exit 0 and the clean study's result; never a traceback or a hang.
Run and export folders are fuzzed in tests/test_fuzz_run_files.py and
tests/test_fuzz_export_files.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from fuzz_helpers import EXAMPLES, check, damage, mutate_json, run
from hypothesis import event, given
from hypothesis import strategies as st

TINY = [
    "--preset", "quickstart", "teacher.model.name=resnet8", "teacher.train.epochs=1",
    "student.train.epochs=1", "teacher.train.warmup_epochs=0", "student.train.warmup_epochs=0",
    "methods=[kd]", "--no-progress",
]  # fmt: skip
REPRODUCE = ["reproduce", *TINY, "--grid", "distill.temperature=2,4"]
TUNE = ["tune", *TINY, "--trials", "1"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """A finished reproduce study (kd over a two-value grid) and a finished one-trial tune study."""
    root = tmp_path_factory.mktemp("fuzz-study")
    for name, argv in (("reproduce", REPRODUCE), ("tune", TUNE)):
        code, _, err = run([*argv, "--out", str(root / name)])
        assert code == 0, err
    return {"reproduce": root / "reproduce", "tune": root / "tune"}


def damaged_copy(source: Path, name: str, tmp_path_factory, data) -> Path:
    """The study copied, its file `name` damaged in one of the ways its format allows."""
    folder = tmp_path_factory.mktemp("case") / source.name
    shutil.copytree(source, folder)
    path = folder / name
    kinds = {".yaml": ["truncate", "flip", "yaml"], ".json": ["truncate", "flip", "json"]}
    how = data.draw(st.sampled_from(kinds.get(path.suffix, ["truncate", "flip"])))
    event(f"{name} {how}")
    if how == "yaml":
        path.write_text(yaml.safe_dump(mutate_json(yaml.safe_load(path.read_text()), data.draw)))
    elif how == "json":
        path.write_text(json.dumps(mutate_json(json.loads(path.read_text()), data.draw)))
    else:
        path.write_bytes(damage(path.read_bytes(), how, data.draw))
    return folder


def comparison(folder: Path) -> str:
    """comparison.json with the study's own path taken out (its runs are named by path)."""
    return (folder / "comparison.json").read_text().replace(str(folder), "STUDY")


@pytest.mark.slow
@EXAMPLES
@given(data=st.data())
def test_a_rerun_reproduce_on_damaged_study_files_is_one_line_or_the_same_study(
    studies, tmp_path_factory, data
):
    source = studies["reproduce"]
    name = data.draw(st.sampled_from(["reproduce.yaml", "comparison.json"]))
    folder = damaged_copy(source, name, tmp_path_factory, data)
    code, _, err = run([*REPRODUCE, "--out", str(folder)])
    check(code, err)
    event(f"exit {code}")
    if code == 0:  # the command's own study, recorded and compared again
        assert (folder / "reproduce.yaml").read_text() == (source / "reproduce.yaml").read_text()
        assert comparison(folder) == comparison(source)


@pytest.mark.slow
@EXAMPLES
@given(data=st.data())
def test_a_rerun_tune_on_damaged_study_files_is_one_line_or_a_finished_study(
    studies, tmp_path_factory, data
):
    source = studies["tune"]
    name = data.draw(st.sampled_from(["tune.yaml", "study-key", "study.db", "best.json"]))
    folder = damaged_copy(source, name, tmp_path_factory, data)
    code, _, err = run([*TUNE, "--out", str(folder)])
    check(code, err)
    event(f"exit {code}")
    if code != 0:
        return
    assert (folder / "tune.yaml").read_text() == (source / "tune.yaml").read_text()
    best = json.loads((folder / "best.json").read_text())["kd"]
    assert best["finished_trials"] >= 1
    assert (folder / "kd" / best["run"] / "model.json").is_file()
    if name in ("tune.yaml", "best.json"):  # the storage holds the finished trial: no retraining
        assert best == json.loads((source / "best.json").read_text())["kd"]
