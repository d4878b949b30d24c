"""`erde reproduce --jobs N`: students in parallel processes write what a serial run writes."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from erde.device import cores

pytestmark = pytest.mark.slow

SHORT = ["teacher.train.epochs=2", "student.train.epochs=2"]
NO_WARMUP = ["teacher.train.warmup_epochs=0"]
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


def children(pid: int) -> set[int]:
    """The pids of a process's children, from /proc (every thread's list)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found |= {int(p) for p in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has stopped, only its parent has not reaped it


def _default_sigint() -> None:
    """SIGINT as an interactive shell leaves it: a pytest started in the background (`&`) runs
    with SIGINT ignored, which its children inherit, and Python then ignores Ctrl-C too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_parent_stops_every_job(tmp_path, signal_name):
    """SIGTERM (or SIGINT to the parent alone) ends `--jobs 2` with no worker left training."""
    log = tmp_path / "log.txt"
    argv = ["reproduce", "--preset", "quickstart", "teacher.train.epochs=1", *NO_WARMUP]
    argv += ["student.train.epochs=500", "distill.teacher_cache=false"]  # no 500-epoch cache fill
    argv += ["--out", str(tmp_path / "out"), "--jobs", "2"]
    with log.open("w") as sink:
        parent = subprocess.Popen(
            [sys.executable, "-m", "erde", *argv, "--no-progress"], stdout=sink, stderr=sink,
            preexec_fn=_default_sigint,
        )  # fmt: skip
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while len(workers) < 2 or "epoch" not in log.read_text().split("at a time")[-1]:
            assert parent.poll() is None and time.monotonic() < deadline, log.read_text()
            workers = {p for p in children(parent.pid) if "spawn_main" in cmdline(p)}
            time.sleep(0.2)
        parent.send_signal(getattr(signal, signal_name))
        assert parent.wait(timeout=20) == 130
        assert "erde reproduce: interrupted" in log.read_text().splitlines()
        time.sleep(3)
        assert [p for p in workers if alive(p)] == [], log.read_text()
    finally:
        parent.kill()
        parent.wait()
        for pid in workers:  # left by a failure: never outlive the test
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
