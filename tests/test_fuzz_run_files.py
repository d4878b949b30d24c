"""Every kind of run-folder file, damaged at random (truncated, bytes flipped, JSON values
replaced by other types or values): the command that reads it ends with exit status 2 and one
line, or with exit 0 and the right result; never a traceback, a hang or a wrong answer.
Export files are fuzzed beside the export code (tests/test_deploy.py)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erde.cli import main
from erde.config import load_config
from erde.evaluation.runs import evaluate_run
from erde.train import fit

FAST = ["model.name=resnet8", "data.crop_padding=1", "train.warmup_epochs=0", "train.epochs=1"]
EXAMPLES = settings(
    max_examples=30,
    deadline=None,  # a hang is caught by the alarm in `run`, not by timing
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.none()),
)  # fmt: skip


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, float]:
    """A finished, evaluated run and its test accuracy at the chosen threshold."""
    run = tmp_path_factory.mktemp("fuzz") / "run"
    fit(load_config("digits-student", FAST), run, progress=False)
    return run, evaluate_run(run, device="cpu").chosen.test_accuracy


def run(argv: list[str]) -> tuple[int, str]:
    """`erde ARGV` in this process, stopped after 120 s (a hang fails the test)."""

    def hang(*_):
        raise TimeoutError(f"erde {' '.join(argv)} hangs")

    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(120)
    logger = logging.getLogger("erde")
    handlers = logger.handlers[:]  # `main` logs to this call's stdout, not an earlier test's
    logger.handlers = [h for h in handlers if h.name != "erde-stdout"]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        logger.handlers = handlers
    return code, err.getvalue()


def damage(data: bytes, how: str, draw) -> bytes:
    if how == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    flipped = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        flipped[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(flipped)


def mutate_json(value, draw):
    """One field somewhere in a JSON document replaced by another value of any type."""
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        deeper = draw(st.booleans()) and isinstance(value[key], (dict, list)) and value[key]
        return {**value, key: mutate_json(value[key], draw) if deeper else draw(JSON_VALUES)}
    if isinstance(value, list) and value:
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], draw(JSON_VALUES), *value[i + 1 :]]
    return draw(JSON_VALUES)


def check(code: int, err: str) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("erde "), err


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
    code, err = run(["evaluate", str(folder), "--device", "cpu"])
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
    check(*run(["train", "--resume", "--no-progress", "--out", str(folder)]))
    assert (folder / "model.safetensors").read_bytes() == weights  # a finished run stays as it is
