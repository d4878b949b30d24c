"""`erde reproduce --jobs N`: students in parallel processes write what a serial run writes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from erde.device import cores

pytestmark = pytest.mark.slow

SHORT = ["teacher.train.epochs=2", "student.train.epochs=2"]
# Each of 2 jobs gets cores // 2 threads; the serial run gets the same number, since CPU kernels
# may sum in another order with another number of threads.
THREADS = str(max(1, cores() // 2))


def quickstart(out: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": THREADS}
    return subprocess.run(
        [sys.executable, "-m", "erde", "quickstart", *SHORT, "--out", str(out), "--no-progress",
         *argv],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_jobs_write_the_runs_a_serial_run_writes(tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    done = quickstart(serial)
    assert done.returncode == 0, done.stderr
    done = quickstart(parallel, "--jobs", "2")
    assert done.returncode == 0, done.stderr
    assert "4 runs, 2 at a time" in done.stdout
    assert files(serial) == files(parallel)
    for weights in sorted(serial.rglob("model.safetensors")):
        ours = load_file(str(parallel / weights.relative_to(serial)))
        theirs = load_file(str(weights))
        assert all(ours[k].equal(theirs[k]) for k in theirs), weights
    assert (serial / "comparison.md").read_text() == (parallel / "comparison.md").read_text()


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_failing_job_is_reported_after_the_others_finish(tmp_path, jobs):
    out = tmp_path / "out"
    (out / "kd-s0").mkdir(parents=True)  # the second of the four students
    (out / "kd-s0" / "notes.txt").write_text("not a run folder")
    done = quickstart(out, "--jobs", jobs)
    assert done.returncode == 2
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "1 of 4 run(s) failed (kd-s0:" in err and "is not an erde run folder" in err
    for run in ("ce-s0", "kd-masked-s0", "erde-s0"):
        assert (out / run / "model.safetensors").is_file()
    assert not (out / "kd-s0" / "model.safetensors").exists()


@pytest.mark.parametrize("jobs, message", [("0", "--jobs 0"), ("-1", "--jobs -1")])
def test_jobs_below_one_are_refused(tmp_path, jobs, message):
    done = quickstart(tmp_path / "out", "--jobs", jobs)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "out").exists()


def test_more_jobs_than_runs_use_one_process_per_run(tmp_path):
    done = quickstart(tmp_path / "out", "--jobs", "9", "methods=[kd,erde]")
    assert done.returncode == 0, done.stderr
    assert "--jobs 9: only 2 run(s) to train, so 2 at once" in done.stdout
