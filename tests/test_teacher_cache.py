"""The teacher-output cache: exact, shared by concurrent students, never trusted when damaged."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from erde.config.schema import load_config
from erde.train.engine import fill_teacher_cache, fit

pytestmark = pytest.mark.slow

FAST = ["model.name=resnet8", "train.epochs=2", "train.warmup_epochs=0"]


def student(teacher, *extra):
    return load_config(
        "digits-student", [*FAST, "distill.method=erde", f"distill.teacher={teacher}", *extra]
    )


def weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def epoch_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("epoch*.safetensors"))


@pytest.fixture(scope="module")
def uncached(teacher, tmp_path_factory):
    """The reference: a student whose teacher runs on every batch, no cache involved."""
    run = tmp_path_factory.mktemp("ref") / "erde"
    fit(student(teacher, "distill.teacher_cache=false"), run, progress=False)
    return run


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_students_from_the_cache_equal_students_without_it(teacher, tmp_path, precision):
    folder = tmp_path / "cache"
    extra = [f"train.precision={precision}", f"distill.teacher_cache_dir={folder}"]
    off = tmp_path / "off"
    fit(
        student(teacher, f"train.precision={precision}", "distill.teacher_cache=false"),
        off,
        progress=False,
    )
    assert not folder.exists()
    fit(student(teacher, *extra), tmp_path / "fills", progress=False)
    assert len(epoch_files(folder)) == 2  # one file per epoch
    fit(student(teacher, *extra), tmp_path / "reads", progress=False)
    assert "read from" in (tmp_path / "reads" / "train.log").read_text()
    assert "read from" not in (tmp_path / "fills" / "train.log").read_text()
    assert same_weights(off, tmp_path / "fills") and same_weights(off, tmp_path / "reads")


def test_filled_in_advance_the_cache_serves_every_epoch(teacher, uncached, tmp_path):
    folder = tmp_path / "cache"
    cfg = student(teacher, f"distill.teacher_cache_dir={folder}")
    fill_teacher_cache(cfg)
    stamps = {p: p.stat().st_mtime_ns for p in epoch_files(folder)}
    assert len(stamps) == 2
    fit(cfg, tmp_path / "run", progress=False)
    assert {p: p.stat().st_mtime_ns for p in epoch_files(folder)} == stamps  # only read
    assert (tmp_path / "run" / "train.log").read_text().count("read from") == 2
    assert same_weights(uncached, tmp_path / "run")


def test_another_schedule_gets_its_own_key(teacher, tmp_path):
    folder = tmp_path / "cache"
    fill_teacher_cache(student(teacher, f"distill.teacher_cache_dir={folder}"))
    fill_teacher_cache(student(teacher, f"distill.teacher_cache_dir={folder}", "train.seed=1"))
    assert len([p for p in folder.iterdir() if p.is_dir()]) == 2


def test_damaged_or_foreign_files_are_recomputed_never_used(teacher, uncached, tmp_path):
    folder = tmp_path / "cache"
    cfg = student(teacher, f"distill.teacher_cache_dir={folder}")
    fill_teacher_cache(cfg)
    first, second = epoch_files(folder)
    # Epoch 1: flipped bytes in the data. Epoch 2: a valid file of another key put in its place.
    blob = bytearray(first.read_bytes())
    blob[-100] ^= 0xFF
    first.write_bytes(bytes(blob))
    other = tmp_path / "other"
    fill_teacher_cache(student(teacher, f"distill.teacher_cache_dir={other}", "train.seed=1"))
    second.write_bytes(epoch_files(other)[1].read_bytes())
    fit(cfg, tmp_path / "run", progress=False)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "contents do not match their checksum" in log
    assert "written for another teacher, data or schedule" in log
    assert same_weights(uncached, tmp_path / "run")
    # Both files were rewritten and now read back.
    fit(cfg, tmp_path / "again", progress=False)
    assert (tmp_path / "again" / "train.log").read_text().count("read from") == 2


def test_a_folder_that_refuses_the_cache_costs_only_the_reuse(teacher, uncached, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    run = tmp_path / "run"
    fit(student(teacher, f"distill.teacher_cache_dir={blocker / 'cache'}"), run, progress=False)
    assert (
        "teacher cache not stored, training goes on without it" in (run / "train.log").read_text()
    )
    assert same_weights(uncached, run)


def test_two_students_filling_one_cache_at_once(teacher, tmp_path):
    """Real processes, one thread each; the reference runs beside them with the cache off (the
    same thread count: CPU kernels may sum in another order with another number of threads)."""
    folder = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"a": [], "b": [], "ref": ["distill.teacher_cache=false"]}
    procs = [
        subprocess.Popen(
            [
                sys.executable, "-m", "erde", "train", "digits-student", *FAST,
                "distill.method=erde", f"distill.teacher={teacher}",
                f"distill.teacher_cache_dir={folder}", *extra,
                "--out", str(tmp_path / name), "--no-progress",
            ],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for name, extra in runs.items()
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert same_weights(tmp_path / "ref", tmp_path / "a")
    assert same_weights(tmp_path / "ref", tmp_path / "b")
    # Whatever the interleaving, the files left are whole and pass every check.
    fit(student(teacher, f"distill.teacher_cache_dir={folder}"), tmp_path / "c", progress=False)
    assert (tmp_path / "c" / "train.log").read_text().count("read from") == 2
    assert not list(folder.rglob("*.tmp"))
