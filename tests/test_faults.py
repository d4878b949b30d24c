"""Real `erde` processes killed with SIGKILL, starved of disk or denied a folder: a resumed run
ends with exactly the weights of an uninterrupted one, and no fault leaves a checkpoint that
cannot be read.

A kill "inside a checkpoint write" is aimed, not hoped for: the child's `os.replace` stops the
process (SIGSTOP) just before the rename that would finish the write of the named file, so the
temporary is written and the old file still in place; the test sees the process stopped and only
then sends SIGKILL. (Polling for the temporary instead missed `state.pt`'s millisecond-long write on
a loaded machine.) A kill "during an epoch" comes at a
random moment (fixed seed) after the previous epoch's checkpoint; afterwards the test checks that
it landed before the next checkpoint started.
"""

import ctypes
import hashlib
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from erde.files import read_json
from erde.run.checkpoint import load_state, load_weights
from erde.run.metrics import read_jsonl

# The run-folder layout, spelled out here so that these tests check it independently of the code.
WEIGHTS, SIDECAR, STATE, METRICS = "model.safetensors", "model.json", "state.pt", "metrics.jsonl"

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread: reproducible
TRAIN = [
    "train",
    "digits-student",
    "model.name=resnet8",
    "train.batch_size=128",
    "data.crop_padding=1",
    "train.epochs=3",
]
TIMEOUT = 600  # generous: a loaded machine can take minutes to start a run


def erde(*argv, launcher: tuple[str, ...] = ("-m", "erde"), **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *launcher, *map(str, argv), "--no-progress"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **kwargs,
    )


def erde_run(*argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "erde", *map(str, argv), "--no-progress"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        **kwargs,
    )


def wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    """Poll every 2 ms until `ready()`; fail if the process ends first or the timeout passes."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the process ended (status {proc.returncode}) before {what}")
        time.sleep(0.002)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def temporaries(run: Path) -> set[str]:
    return {p.name for p in run.glob(".*.tmp")}


def assert_readable(run: Path) -> dict:
    """Every checkpoint file present loads with erde's own readers; returns the epochs."""
    epochs = {}
    if (run / WEIGHTS).exists():
        _, meta = load_weights(run)
        epochs["weights"] = meta.epoch
    if (run / STATE).exists():
        epochs["state"] = int(load_state(run)["epoch"])
    epochs["metrics"] = len(read_jsonl(run / METRICS))
    return epochs


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(run)[0]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def digests(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir()}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(root):
    """The run nobody interrupted."""
    result = erde_run(*TRAIN, "--out", root / "reference")
    assert result.returncode == 0, result.stderr
    return root / "reference"


@pytest.fixture(scope="module")
def killed_in_epoch_2(root):
    """A fresh run killed at a random moment of its second epoch (seeded; retried if the moment
    fell outside the epoch). Tests copy it."""
    rng = random.Random(8)
    for attempt in range(3):
        run = root / f"killed-in-epoch-2-{attempt}"
        proc = erde(*TRAIN, "--out", run)
        wait_for(proc, (run / STATE).exists, "the first checkpoint")
        epoch_s = read_jsonl(run / METRICS)[0]["epoch_s"]
        time.sleep(rng.uniform(0.05, 0.6) * epoch_s)
        os.kill(proc.pid, signal.SIGSTOP)
        in_write = temporaries(run)
        kill(proc)
        epochs = assert_readable(run)
        if not in_write and epochs == {"weights": 1, "state": 1, "metrics": 1}:
            return run  # killed after checkpoint 1 and before checkpoint 2 began
    pytest.fail("three random kills all missed the second epoch")


# Run erde with an `os.replace` that stops the process before it renames the temporary of argv[1].
STOP_BEFORE_RENAME = """
import os, runpy, signal, sys
target = sys.argv.pop(1)
replace = os.replace
def stopping_replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == target:
        os.kill(os.getpid(), signal.SIGSTOP)
    return replace(src, dst, *args, **kwargs)
os.replace = stopping_replace
runpy.run_module("erde", run_name="__main__", alter_sys=True)
"""


def stopped(proc: subprocess.Popen) -> bool:
    """SIGSTOP has taken hold (state T in /proc), without reaping the process as waitpid would."""
    stat = Path(f"/proc/{proc.pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def kill_inside_write(run: Path, name: str) -> None:
    """Resume `run` and kill it inside its write of `name`: temporary written, not yet renamed."""
    proc = erde("train", "--resume", "--out", run, launcher=("-c", STOP_BEFORE_RENAME, name))
    wait_for(proc, lambda: stopped(proc), f"a write of {name}")
    kill(proc)


def test_killed_training_resumes_to_the_uninterrupted_weights(reference, killed_in_epoch_2, root):
    run = copy_run(killed_in_epoch_2, root / "killed")

    kill_inside_write(run, WEIGHTS)
    assert any(n.startswith(f".{WEIGHTS}.") for n in temporaries(run))  # the half-written file
    epochs = assert_readable(run)
    assert epochs["weights"] == epochs["state"] == epochs["metrics"] < 3

    kill_inside_write(run, STATE)
    assert any(n.startswith(f".{STATE}.") for n in temporaries(run))
    # The weights of the epoch are in place, the state that declares the epoch done is not.
    epochs = assert_readable(run)
    assert epochs["weights"] == epochs["metrics"] == epochs["state"] + 1

    result = erde_run("train", "--resume", "--out", run)
    assert result.returncode == 0, result.stderr
    assert not temporaries(run)  # the two half-written files were deleted
    assert_same_weights(run, reference)
    assert read_json(run / SIDECAR, "sidecar")["finished"]
    timing = ("epoch_s", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_jsonl(run / METRICS)] == [
        {k: v for k, v in r.items() if k not in timing} for r in read_jsonl(reference / METRICS)
    ]


def _drop_root_override() -> None:
    """Run in the child before exec: without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH in the
    bounding set, an exec'd root process obeys permission bits like any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def as_ordinary_user() -> dict:
    """subprocess options under which permission bits bind, also when the tests run as root."""
    if os.geteuid() != 0:
        return {}
    try:
        subprocess.run([sys.executable, "-c", ""], preexec_fn=_drop_root_override, check=True)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"running as root without the right to drop capabilities ({exc})")
    return {"preexec_fn": _drop_root_override}


def test_read_only_run_folder_fails_cleanly_and_keeps_the_checkpoint(killed_in_epoch_2, root):
    run = copy_run(killed_in_epoch_2, root / "read-only")
    before = digests(run)
    os.chmod(run, 0o555)
    try:
        result = erde_run("train", "--resume", "--out", run, **as_ordinary_user())
    finally:
        os.chmod(run, 0o755)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"could not write {run / WEIGHTS}" in err and "writable" in err
    after = digests(run)
    assert {k: v for k, v in after.items() if k != "train.log"} == {
        k: v for k, v in before.items() if k != "train.log"
    }
    assert assert_readable(run) == {"weights": 1, "state": 1, "metrics": 1}


def _limit_file_size() -> None:
    """A quota in the child: the kernel refuses to grow any file past 64 KiB (EFBIG), in the
    middle of the write, as a full disk does (ENOSPC). Python ignores SIGXFSZ, so the write
    fails with an OSError instead of killing the process."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_full_disk_fails_cleanly_and_keeps_the_checkpoint(killed_in_epoch_2, root):
    run = copy_run(killed_in_epoch_2, root / "full")
    assert (run / WEIGHTS).stat().st_size > 64 * 1024  # the first write of epoch 2 cannot fit
    before = digests(run)
    result = erde_run("train", "--resume", "--out", run, preexec_fn=_limit_file_size)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"could not write {run / WEIGHTS}" in err and "free disk space" in err
    assert not temporaries(run)  # the half-written temporary was removed
    after = digests(run)
    assert {k: v for k, v in after.items() if k != "train.log"} == {
        k: v for k, v in before.items() if k != "train.log"
    }
    # Byte for byte the checkpoint that test_killed_training_... resumes to the reference weights.
    assert assert_readable(run) == {"weights": 1, "state": 1, "metrics": 1}


def test_killed_reproduction_keeps_finished_stages(tmp_path):
    out = tmp_path / "quickstart"
    argv = [
        "reproduce",
        "--preset",
        "quickstart",
        "teacher.train.epochs=1",
        "teacher.train.warmup_epochs=0",
        "student.train.epochs=1",
        "student.train.warmup_epochs=0",
        "methods=[ce,erde]",  # a student without and one with the teacher: enough, and faster
        "--out",
        out,
    ]
    proc = erde(*argv)
    # The teacher is finished and the first student's run folder is set up: kill there.
    wait_for(proc, (out / "ce-s0" / "config.yaml").exists, "the first student started")
    kill(proc)
    teacher = out / "teacher" / WEIGHTS
    assert read_json(out / "teacher" / SIDECAR, "sidecar")["finished"]
    stamp, content = teacher.stat().st_mtime_ns, teacher.read_bytes()

    result = erde_run(*argv)
    assert result.returncode == 0, result.stderr
    assert teacher.stat().st_mtime_ns == stamp and teacher.read_bytes() == content
    for method in ("ce", "erde"):
        meta = read_json(out / f"{method}-s0" / SIDECAR, "sidecar")
        assert meta["finished"] and meta["epoch"] == 1
    assert "| erde (resnet8) | 1 |" in (out / "comparison.md").read_text()


def erde_export(run: Path, out: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "erde", "export", str(run), "--threshold", "1", "--out", str(out)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        **kwargs,
    )


def test_full_disk_during_export_names_the_folder_and_keeps_the_earlier_export(reference, root):
    """RLIMIT_FSIZE (EFBIG, as ENOSPC): the largest graph of a ResNet-8 export does not fit."""
    out = root / "exports" / "full"
    first = erde_export(reference, out)
    assert first.returncode == 0, first.stderr
    assert max(p.stat().st_size for p in out.iterdir()) > 64 * 1024
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # as any folder the user makes
    before = digests(out)
    result = erde_export(reference, out, preexec_fn=_limit_file_size)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "Errno" not in err
    assert f"could not write the export {out} (File too large)" in err
    assert "free disk space" in err and "choose another --out" in err
    assert digests(out) == before  # the earlier export, byte for byte
    assert sorted(p.name for p in out.parent.iterdir()) == ["full"]  # no staging folder left


def test_export_into_a_read_only_folder_names_it(reference, root):
    """A folder without write permission (EACCES), for an ordinary user."""
    parent = root / "exports" / "read-only"
    parent.mkdir(parents=True)
    os.chmod(parent, 0o500)
    try:
        result = erde_export(reference, parent / "E", **as_ordinary_user())
    finally:
        os.chmod(parent, 0o755)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"could not write the export {parent / 'E'} (Permission denied)" in err
    assert f"make {parent} writable, or choose another --out" in err
    assert list(parent.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_log_line_the_disk_refuses_is_one_message():
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    from erde.errors import ErdeError
    from erde.train.loggers import MetricsFile
    from erde.train.writer import RunLog

    with pytest.raises(ErdeError, match=r"could not write /dev/full \(No space left on device\)"):
        MetricsFile(Path("/dev/full")).log({"epoch": 1})
    logger = logging.getLogger("test_faults.full")
    handler = RunLog("/dev/full")
    logger.addHandler(handler)
    try:
        with pytest.raises(ErdeError, match=r"could not write /dev/full .*free disk space"):
            logger.warning("one line too many")
    finally:
        logger.removeHandler(handler)
        handler.close()
