"""Issue 14: one writer per run folder, every file read checked, values checked for meaning,
data walked safely, sizes guarded. The documented messages are rows of docs/errors.md (run by
test_errors.py); these tests cover what a table row cannot: real concurrent processes, links
and loops, and the rules at the library level."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_faults import as_ordinary_user

from erde.config.schema import load_config
from erde.data.image_data import build_image_data
from erde.data.image_folder import load_image_folder
from erde.data.pixels import decode_image
from erde.data.walk import files_under
from erde.errors import ErdeError
from erde.evaluation.cache import LogitsCache, cache_problem
from erde.models import create_model
from erde.run.lock import writer_lock
from erde.run.metrics import read_jsonl
from erde.run.model_info import ModelInfo

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FAST = ["model.name=resnet8", "data.crop_padding=1", "train.warmup_epochs=0"]


def erde(*argv: str, cwd: Path, **options) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "erde", *argv],
        capture_output=True, text=True, env=ENV, cwd=cwd, **options,
    )  # fmt: skip


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_killed_one_blocks_nothing(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "erde", "train", "digits-student", *FAST, "train.epochs=200",
         "--no-progress", "--out", str(run)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (run / "config.yaml").is_file():  # the first process is writing the folder
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first training never started"
            time.sleep(0.2)
        for argv in (
            ["train", "digits-student", *FAST, "train.seed=1", "--overwrite", "--out", str(run)],
            ["train", "--resume", "--out", str(run)],
            ["evaluate", str(run)],
        ):
            second = erde(*argv, cwd=tmp_path)
            assert second.returncode == 2, second.stderr
            assert "Traceback" not in second.stderr
            assert f"is being written by another live process (pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first one goes on undisturbed
    finally:
        first.kill()
        first.wait(timeout=60)
    with writer_lock(run):  # the lock of the killed process is gone with it
        pass


# Tries the writer lock of the folder argv[1] once: prints "held", or the refusal.
TRY_WRITER = """
import sys
from erde.errors import ErdeError
from erde.run.lock import writer_lock
try:
    with writer_lock(sys.argv[1]):
        print("held")
except ErdeError as exc:
    print(exc)
"""


def try_writer(path: Path) -> str:
    """What another process gets when it asks for `path`'s writer lock now."""
    argv = [sys.executable, "-c", TRY_WRITER, str(path)]
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, check=True)
    return done.stdout.strip()


def test_the_writer_lock_is_reentrant_in_one_process(tmp_path):
    """Entered twice by this process, the lock is still this process's after the inner exit,
    and another process is refused until the outer one ends; then the other one gets it."""
    run = tmp_path / "run"
    busy = f"is being written by another live process (pid {os.getpid()}"
    with writer_lock(run):
        with writer_lock(run):
            assert busy in try_writer(run)
        assert busy in try_writer(run)
    assert try_writer(run) == "held"
    with writer_lock(run):  # and this process can take it again
        assert busy in try_writer(run)


# Holds a lock of the folder argv[2] ("writer" or "run" lock, argv[1]) until stdin closes;
# prints "held", or "busy" when another process holds the run lock.
HOLD = """
import sys
from pathlib import Path
from erde.run.lock import run_lock, writer_lock
path = Path(sys.argv[2])
lock = writer_lock(path) if sys.argv[1] == "writer" else run_lock(path, wait=False)
with lock as held:
    print("busy" if held is False else "held", flush=True)
    sys.stdin.read()
"""


def holding(kind: str, path: Path) -> subprocess.Popen:
    """A live process holding `kind` lock of `path` (once this returns)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, kind, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def linked_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder and a symbolic link to it from another folder (another `.locks/`)."""
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    link = tmp_path / "elsewhere" / "alias"
    link.parent.mkdir()
    link.symlink_to(run, target_is_directory=True)
    return run, link


@pytest.mark.parametrize("holds_link", [False, True])
def test_a_writer_through_a_symbolic_link_meets_the_same_lock(tmp_path, holds_link):
    run, link = linked_run(tmp_path)
    held, tried = (link, run) if holds_link else (run, link)
    holder = holding("writer", held)
    try:
        for argv in (
            ["evaluate", str(tried)],
            ["train", "digits-student", *FAST, "train.epochs=1", "--out", str(tried)],
        ):
            second = erde(*argv, cwd=tmp_path)
            assert second.returncode == 2, second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in second.stderr
            assert f"is being written by another live process (pid {holder.pid}: " in lines[0]
            assert "-c" in lines[0]  # the holder's command line, as it wrote it
        assert not (run / "config.yaml").exists()  # the refused train wrote nothing
    finally:
        holder.communicate(input="", timeout=60)
    with writer_lock(tried):  # released with its process
        pass


def read_only(*folders: Path) -> None:
    for folder in folders:
        for path in (folder, *folder.rglob("*")):
            path.chmod(path.stat().st_mode & ~0o222)


def writable(*folders: Path) -> None:
    for folder in folders:
        for path in (folder, *folder.rglob("*")):
            path.chmod(path.stat().st_mode | 0o200)


def test_locks_need_no_writable_parent_and_leave_nothing_beside_the_run(teacher, tmp_path):
    """A writable run in a read-only folder evaluates, a read-only teacher teaches, and a
    refused `erde train` leaves no lock file, nor its run folder, behind."""
    parent, shared, run = tmp_path / "parent", tmp_path / "shared", tmp_path / "parent" / "run"
    shutil.copytree(teacher, run)  # a run of its own, in a folder that holds nothing else
    shutil.copytree(teacher, shared / "teacher")
    read_only(shared)
    parent.chmod(0o555)
    user = as_ordinary_user()
    try:
        done = erde("evaluate", str(run), cwd=tmp_path, **user)
        assert done.returncode == 0, done.stderr
        done = erde(
            "reproduce", "--preset", "quickstart", "--teacher", str(shared / "teacher"),
            "--out", str(tmp_path / "study"), "student.train.epochs=1",
            "student.train.warmup_epochs=0", "student.model.name=resnet8",
            "methods=[kd]", cwd=tmp_path, **user,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    finally:
        parent.chmod(0o755)
        writable(shared)
    assert sorted(p.name for p in parent.iterdir()) == ["run"]
    assert not (shared / ".locks").exists() and not (shared / "teacher" / ".locks").exists()
    out = tmp_path / "new" / "run"
    done = erde("train", "digits-student", "train.batch_size=5000", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 2 and "batch_size" in done.stderr
    assert not (tmp_path / "new").exists() and not (tmp_path / ".locks").exists()


def test_a_run_lock_through_a_symbolic_link_meets_the_same_lock(tmp_path):
    run, link = linked_run(tmp_path)
    holder = holding("run", run)
    try:
        other = subprocess.run(
            [sys.executable, "-c", HOLD, "run", str(link)],
            input="", capture_output=True, text=True, env=ENV, timeout=120,
        )  # fmt: skip
        assert other.returncode == 0, other.stderr
        assert other.stdout.strip() == "busy"
    finally:
        holder.communicate(input="", timeout=60)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.momentum=7", "train.momentum=7.0 must lie in [0, 1)"),
        ("train.momentum=1", "train.momentum=1.0 must lie in [0, 1)"),
        ("train.gamma=0", "train.gamma=0.0 must lie in (0, 1]"),
        ("train.gamma=1.5", "train.gamma=1.5 must lie in (0, 1]"),
        ("train.seed=-1", "train.seed=-1 must lie in [0, 4294967295]"),
        ("train.seed=4294967296", "train.seed=4294967296 must lie in [0, 4294967295]"),
        ("train.warmup_epochs=nan", "train.warmup_epochs=nan must be a finite number"),
        ("train.lr=-inf", "train.lr=-inf must be a finite number"),
        ("distill.temperature=inf", "distill.temperature=inf must be a finite number"),
        ("data.val_size=nan", "data.val_size=nan must be a finite number"),
        ("train.milestones=[0.5,.nan]", "train.milestones=[0.5, nan] must be fractions"),
        ("model.options.width=.inf", "model.options.width=inf must be a finite number"),
    ],
)
def test_config_values_are_checked_for_meaning(override, message):
    with pytest.raises(ErdeError) as raised:
        load_config("digits-student", [override])
    assert str(raised.value).startswith(message)


def test_an_empty_config_file_is_refused(tmp_path):
    for text in ("", "\n", "# only a comment\n", "{}\n"):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ErdeError, match="is empty"):
            load_config(str(tmp_path / "c.yaml"))


def test_no_run_folder_before_validation_passes(tmp_path):
    out = tmp_path / "deep" / "run"
    for argv in (["train.seed=-1"], ["train.batch_size=5000"], ["data.crop_padding=8"]):
        result = erde("train", "digits-student", *argv, "--out", str(out), cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert not out.exists()


def write_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_symlink_loops_are_walked_once(tmp_path):
    write_images(tmp_path)
    (tmp_path / "train" / "a" / "loop").symlink_to(tmp_path / "train" / "a")
    (tmp_path / "train" / "a" / "up").symlink_to(tmp_path / "train")
    (tmp_path / "train" / "b" / "dangling").symlink_to(tmp_path / "nowhere")
    data = load_image_folder(str(tmp_path))
    # each real file once: 2 of a, 2 of b, plus b's files through a/up/b (a link to a folder
    # outside the class is an ordinary folder of that class)
    assert len(data.train_y) <= 6
    assert len(files_under(tmp_path / "train" / "a", (".png",))) == 4  # a's 2 + up/b's 2


def test_special_files_are_refused_unopened(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ErdeError, match="not a regular file"):
        decode_image(fifo)  # opening it for reading would wait forever
    with pytest.raises(ErdeError, match="not a regular file"):
        files_under(tmp_path, (".png",))
    with pytest.raises(ErdeError, match="not a regular file"):
        decode_image(tmp_path)


def npz_labels(y_train, y_test=None, classes=None):
    x = np.zeros((len(y_train), 4, 4, 1), np.uint8)
    y_test = y_train if y_test is None else y_test
    xt = np.zeros((len(y_test), 4, 4, 1), np.uint8)
    return build_image_data("npz", (x, y_train), (xt, y_test), classes=classes, hflip=False)


def test_npz_labels_are_checked_before_use():
    with pytest.raises(ErdeError, match="beyond the int64 range"):
        npz_labels(np.array([0, 2**64 - 1], np.uint64))
    with pytest.raises(ErdeError, match="images of only 2 of them"):
        npz_labels(np.array([0, 10**15]))  # no list of 10**15 names is built
    with pytest.raises(ErdeError, match="none of label 1"):
        npz_labels(np.array([0, 2, 0, 2]))
    with pytest.raises(ErdeError, match="none of label 2"):
        npz_labels(np.array([0, 1]), np.array([2]))  # a class only the test split has
    with pytest.raises(ErdeError, match="list a more than once"):
        npz_labels(np.array([0, 1, 2]), classes=["a", "b", "a"])
    assert npz_labels(np.array([1, 0], np.uint8)).classes == ["0", "1"]


def test_sizes_beyond_the_machine_are_refused_before_allocating():
    with pytest.raises(ErdeError, match="would need about"):
        create_model("resnet20", input_size=10**6)
    with pytest.raises(ErdeError, match="would need about"):
        create_model("resnet20", num_classes=10**12)
    with pytest.raises(ErdeError, match="would need about"):
        create_model("resnet20", in_channels=10**12)


def test_metrics_lines_are_checked(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "train/loss": 0.5}\n\n')
    assert read_jsonl(path) == [{"epoch": 1, "train/loss": 0.5}]
    for text, what in (
        ('{"epoch": 1\n', "line 1 is damaged: not JSON"),
        ('{"epoch": 1}\n[1]\n', "line 2 is damaged: not a JSON object"),
        ('{"epoch": true}\n', "field 'epoch': input should be a valid integer"),
        ('{"epoch": 1, "lr": "0.1"}\n', "field 'lr': is not a number"),
        ('{"epoch": 1, "val/acc/2": 0.5}\n', "not exits 1..n"),
        ('{"epoch": 1, "format_version": 3}\n', "line 1 has format version 3, this erde reads"),
        (b"\xff\xfe{".decode("latin-1"), "not JSON"),
    ):
        path.write_text(text)
        with pytest.raises(ErdeError, match=what):
            read_jsonl(path)


def sidecar() -> dict:
    return {
        "arch": {"name": "resnet8", "num_classes": 2, "in_channels": 1, "input_size": 8,
                 "exits": [1]},
        "exit_macs": [10, 20],
        "static_macs": 15,
        "data": {"source": "npz", "classes": ["a", "b"], "mean": [0.5], "std": [0.2],
                 "input_size": 8, "in_channels": 1},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"seed": "0"}, "'seed'"),
        ({"seed": True}, "'seed'"),
        ({"finished": 1}, "'finished'"),
        ({"teacher": 3}, "'teacher'"),
        ({"pairing": {"a": 1}}, "'pairing'"),
        ({"config": []}, "'config'"),
        ({"arch": {"name": "resnet8", "num_classes": 10**12}}, "'arch.num_classes'"),
        ({"arch": {"name": "resnet8", "in_channels": 3}}, "'arch.in_channels'"),
        ({"arch": {"name": "resnet8", "input_size": -8}}, "'arch.input_size'"),
        ({"arch": {"name": "resnet8", "exits": "1"}}, "'arch.exits'"),
    ],
)
def test_sidecar_fields_are_checked(change, field):
    ModelInfo.from_json(sidecar())
    with pytest.raises(ErdeError, match=f"model.json: field {field}"):
        ModelInfo.from_json({**sidecar(), **change})


def logits_cache(**changes) -> LogitsCache:
    z = {s: torch.zeros(3, 2, 4) for s in ("val", "test")}
    y = {s: torch.tensor([0, 1, 3]) for s in ("val", "test")}
    cache = LogitsCache(z, y, [10, 20], "0" * 64)
    for key, value in changes.items():
        setattr(cache, key, value)
    return cache


@pytest.mark.parametrize(
    ("cache", "field"),
    [
        (logits_cache(exit_macs=[]), "'exit_macs'"),
        (logits_cache(exit_macs=[10, "20"]), "'exit_macs'"),
        (logits_cache(exit_macs=[20, 10]), "'exit_macs'"),
        (logits_cache(weights_sha256="abc"), "'weights_sha256'"),
        (logits_cache(logits={"val": torch.zeros(3, 3, 4), "test": torch.zeros(3, 2, 4)}),
         "'val/logits'"),
        (logits_cache(logits={"val": torch.zeros(3, 2, 4, dtype=torch.float64),
                              "test": torch.zeros(3, 2, 4)}), "'val/logits'"),
        (logits_cache(labels={"val": torch.tensor([0, 1]), "test": torch.tensor([0, 1, 2])}),
         "'val/labels'"),
        (logits_cache(labels={"val": torch.tensor([0, 1, 4]), "test": torch.tensor([0, 1, 2])}),
         "'val/labels'"),
        (logits_cache(logits={"val": torch.full((3, 2, 4), float("nan")),
                              "test": torch.zeros(3, 2, 4)}), "'val/logits'"),
    ],
)  # fmt: skip
def test_logits_cache_fields_are_checked(cache, field):
    assert cache_problem(logits_cache()) is None
    assert field in cache_problem(cache)


def test_integers_too_long_for_python_or_float_are_damage_not_tracebacks(tmp_path):
    """JSON allows any integer; Python refuses ones over 4300 digits and floats end at 1e308."""
    huge = "9" * 5000
    (tmp_path / "metrics.jsonl").write_text(f'{{"epoch": {huge}}}\n')
    with pytest.raises(ErdeError, match="line 1 is damaged"):
        read_jsonl(tmp_path / "metrics.jsonl")
    from erde.files import read_json

    (tmp_path / "report.json").write_text(f'{{"threshold": {huge}}}')
    with pytest.raises(ErdeError, match="is corrupt"):
        read_json(tmp_path / "report.json", "report")
    from pydantic import TypeAdapter

    from erde.run.formats import Finite

    finite = TypeAdapter(Finite)
    assert finite.validate_python(10**300) == 1e300
    for value in (10**400, True, float("inf")):
        with pytest.raises(ValueError):
            finite.validate_python(value)


# Replaces argv[1] by the files argv[2:] in turn, each written to a temporary and renamed over
# it as `erde train` writes a checkpoint, until killed; says "ready" after the first rename.
REPLACE_IN_TURN = """
import os, sys, time
target, versions = sys.argv[1], [open(p, "rb").read() for p in sys.argv[2:]]
i = 0
while True:
    tmp = f"{sys.argv[2]}.next"
    with open(tmp, "wb") as fh:
        fh.write(versions[i % len(versions)])
    os.replace(tmp, target)
    if i == 0:
        print("ready", flush=True)
    i += 1
    time.sleep(0.005)
"""


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_exports_and_caches_record_the_weights_they_hold_while_a_writer_replaces_them(
    teacher, tmp_path
):
    """Defect 11: a second process swaps the run's weights between two versions every few
    milliseconds, as a `train --resume` or `--overwrite` would. Version B adds 1000 to the final
    exit's class-0 logit, so each result shows which weights it was computed from, and the
    digest it records must be of those."""
    import onnxruntime
    from safetensors.torch import load_file, save_file

    from erde.deploy import export_run
    from erde.evaluation.cache import load_cache

    run = Path(shutil.copytree(teacher, tmp_path / "run"))
    weights = run / "model.safetensors"
    state = load_file(weights)
    last = max(int(k.split(".")[1]) for k in state if k.startswith("heads."))
    bias = next(k for k in sorted(state, reverse=True) if k.startswith(f"heads.{last}.") and
                k.endswith(".bias") and state[k].shape == (10,))  # fmt: skip
    shifted = {**state, bias: state[bias] + torch.tensor([1000.0] + [0.0] * 9)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    shutil.copy(weights, a)
    save_file(shifted, str(b))
    is_b = {_sha256(a): False, _sha256(b): True}
    swapper = subprocess.Popen(
        [sys.executable, "-c", REPLACE_IN_TURN, str(weights), str(a), str(b)],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    seen = []
    try:
        assert swapper.stdout.readline().strip() == "ready"
        for i in range(3):
            cache = load_cache(run, refresh=True)
            from_b = bool(cache.logits["val"][:, -1, 0].min() > 500)
            assert is_b[cache.weights_sha256] == from_b, f"cache {i}: digest of other weights"
            out = tmp_path / f"export{i}"
            export_run(run, out, threshold=1.0)
            digest = json.loads((out / "manifest.json").read_text())["weights_sha256"]
            session = onnxruntime.InferenceSession(str(out / "static.onnx"))
            logits = session.run(None, {"image": np.zeros((2, 1, 8, 8), np.float32)})[0]
            from_b = bool(logits[:, 0].min() > 500)
            assert is_b[digest] == from_b, f"export {i}: the manifest names other weights"
            seen += [is_b[cache.weights_sha256], is_b[digest]]
    finally:
        swapper.kill()
        swapper.wait(timeout=60)
    print(f"results from version B: {sum(seen)} of {len(seen)}")


def damaged_tiff(path: Path) -> Path:
    """An LZW TIFF whose compressed strip is overwritten with 0xFF bytes: libtiff's LZW decoder
    meets codes that are not in its table."""
    import io

    buf = io.BytesIO()
    pixels = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    Image.fromarray(pixels).save(buf, "TIFF", compression="tiff_lzw")
    good = buf.getvalue()
    path.write_bytes(good[:8] + b"\xff" * (len(good) - 208) + good[-200:])
    return path


def test_a_damaged_tiff_is_one_message_and_nothing_on_stderr(tmp_path, capfd):
    tiff = damaged_tiff(tmp_path / "damaged.tif")
    with Image.open(tiff) as img, pytest.raises(OSError):  # Pillow alone: libtiff's own line
        img.load()
    assert "Using code not yet in table" in capfd.readouterr().err  # written from C, to fd 2
    with pytest.raises(ErdeError, match=f"{tiff}: cannot decode the image"):
        decode_image(tiff, 1)
    print("stderr still works", file=sys.stderr)
    assert capfd.readouterr().err == "stderr still works\n"


def test_a_tiff_header_pillow_logs_about_is_one_message_and_nothing_on_stderr(tmp_path):
    """An RGB TIFF whose SamplesPerPixel says 7: Pillow logs an error record, which Python
    prints to stderr when no handler is set (as on the command line), beside erde's line."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "TIFF")
    samples = b"\x15\x01\x03\x00\x01\x00\x00\x00"  # tag 277, SHORT, one value: 3 (little-endian)
    assert buf.getvalue().count(samples + b"\x03\x00") == 1
    tiff = tmp_path / "seven.tif"
    tiff.write_bytes(buf.getvalue().replace(samples + b"\x03\x00", samples + b"\x07\x00"))
    code = (
        "import sys; from erde.data.decode import decode_image; from erde.errors import ErdeError\n"
        "try: decode_image(sys.argv[1])\n"
        "except ErdeError as exc: print(exc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiff)], capture_output=True, text=True, env=ENV
    )
    assert f"{tiff}: cannot decode the image" in done.stdout
    assert done.stderr == ""
