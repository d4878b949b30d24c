"""What the fuzz tests of damaged files share (tests/test_fuzz_run_files.py for run folders,
tests/test_fuzz_export_files.py for export folders): a fast digits run, the hypothesis settings,
the ways to damage a file, and the check that a command ended cleanly."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import signal

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from erde.cli.main import main

# A digits student in seconds: the smallest network, one epoch.
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


def run(argv: list[str]) -> tuple[int, str, str]:
    """`erde ARGV` in this process: (exit status, stdout, stderr), stopped after 120 s (a hang
    fails the test)."""

    def hang(*_):
        raise TimeoutError(f"erde {' '.join(argv)} hangs")

    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(120)
    logger = logging.getLogger("erde")
    handlers = logger.handlers[:]  # `main` logs to this call's stdout, not an earlier test's
    logger.handlers = [h for h in handlers if h.name != "erde-stdout"]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        logger.handlers = handlers
    return code, out.getvalue(), err.getvalue()


def damage(data: bytes, how: str, draw) -> bytes:
    """`data` cut short ("truncate") or with one to four bits flipped ("flip")."""
    if how == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    flipped = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        flipped[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(flipped)


def mutate_json(value, draw, values: st.SearchStrategy = JSON_VALUES):
    """One field somewhere in a JSON document replaced by another value of any type (one of
    `values`)."""
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        deeper = draw(st.booleans()) and isinstance(value[key], (dict, list)) and value[key]
        return {**value, key: mutate_json(value[key], draw, values) if deeper else draw(values)}
    if isinstance(value, list) and value:
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], draw(values), *value[i + 1 :]]
    return draw(values)


# JSON text that json.dumps of a Python value never writes: the NaN and Infinity literals (which
# Python's parser and pydantic's accept), integers beyond any float, unicode, duplicate keys,
# nesting a little deep or deeper than any parser's limit.
_LEAVES = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "null", "true", "[]", "{}"]),
    st.integers(-(2**80), 2**80).map(str), st.integers(300, 5000).map(lambda n: "9" * n),
    st.floats().map(json.dumps),
    st.text(max_size=4).map(lambda t: json.dumps(t, ensure_ascii=False)),
)  # fmt: skip
_KEYS = st.sampled_from(
    ["a", "threshold", "", "é", r"\u00e9", r"\ud800", r"\u0000"]
)  # escapes as JSON text
NESTED_JSON = st.one_of(
    st.recursive(
        _LEAVES,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3).map(lambda v: f"[{','.join(v)}]"),
            st.lists(st.tuples(_KEYS, inner), max_size=3).map(  # keys repeat: duplicates
                lambda kv: "{" + ",".join(f'"{k}":{v}' for k, v in kv) + "}"
            ),
        ),
        max_leaves=8,
    ),
    st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 200_000).map(lambda n: '{"a":' * n + "0" + "}" * n),
)
_HOLE = "\x00erde-fuzz-hole"


def nest_json(value, draw) -> str:
    """A JSON document as text with one field somewhere replaced by `NESTED_JSON` text."""
    text = json.dumps(mutate_json(value, draw, st.just(_HOLE)))
    return text.replace(json.dumps(_HOLE), draw(NESTED_JSON), 1)


def check(code: int, err: str) -> None:
    """Exit 0, or exit 2 with one `erde CMD: error: ...` line; never a traceback."""
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("erde "), err
