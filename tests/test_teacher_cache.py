"""The teacher-output cache: exact, shared by concurrent students, never trusted when damaged."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from erde.config.schema import load_config
from erde.train.engine import fill_teacher_cache, fit

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_another_schedule_gets_its_own_key(teacher, tmp_path):
    folder = tmp_path / "cache"
    fill_teacher_cache(student(teacher, f"distill.teacher_cache_dir={folder}"))
    fill_teacher_cache(student(teacher, f"distill.teacher_cache_dir={folder}", "train.seed=1"))
    assert len([p for p in folder.iterdir() if p.is_dir()]) == 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_folder_that_refuses_the_cache_costs_only_the_reuse(teacher, uncached, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    run = tmp_path / "run"
    fit(student(teacher, f"distill.teacher_cache_dir={blocker / 'cache'}"), run, progress=False)
    assert (
        "teacher cache not stored, training goes on without it" in (run / "train.log").read_text()
    )
    assert same_weights(uncached, run)


@pytest.mark.slow
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


# The student's own statistics, away from the digits' (the teacher's, computed from its split).
OWN_STATS = ["data.mean=[0.2]", "data.std=[0.5]"]


@pytest.mark.slow
def test_a_student_with_its_own_statistics_gets_the_same_weights_with_the_cache(teacher, tmp_path):
    """A cache filled by a student on the default statistics, then students on other statistics
    (filling the cache, then reading it): bit for bit the weights of the one without a cache."""
    folder = tmp_path / "cache"
    fill_teacher_cache(student(teacher, f"distill.teacher_cache_dir={folder}"))
    off = tmp_path / "off"
    fit(student(teacher, *OWN_STATS, "distill.teacher_cache=false"), off, progress=False)
    cfg = student(teacher, *OWN_STATS, f"distill.teacher_cache_dir={folder}")
    fit(cfg, tmp_path / "fills", progress=False)  # its own key: computed, then stored
    fit(cfg, tmp_path / "reads", progress=False)
    assert (tmp_path / "reads" / "train.log").read_text().count("read from") == 2
    assert same_weights(off, tmp_path / "fills") and same_weights(off, tmp_path / "reads")


@pytest.mark.slow
def test_the_teacher_reads_its_own_normalisation_inside_a_student_run(teacher, tmp_path):
    """The stored teacher outputs of a student on other statistics equal the teacher run by hand
    on the epoch's raw pixels normalised with the teacher's own statistics (model.json)."""
    import json

    import torch

    from erde.data.prepare import prepare_data, train_batches
    from erde.models.load import load_model

    folder = tmp_path / "cache"
    fit(student(teacher, *OWN_STATS, f"distill.teacher_cache_dir={folder}"), tmp_path / "s")
    stored = load_file(str(epoch_files(folder)[0]))["logits"]
    # The epoch's raw augmented pixels: batches "normalised" with mean 0, std 1/255 (x * 1.0).
    raw_cfg = student(teacher, "data.mean=[0.0]", f"data.std=[{1 / 255!r}]")
    batches = train_batches(raw_cfg, prepare_data(raw_cfg), torch.device("cpu"))
    batches.set_epoch(0)
    pixels = torch.cat([x for x, _ in batches])
    assert pixels.eq(pixels.round()).all() and pixels.max() <= 255
    own = json.loads((teacher / "model.json").read_text())["data"]
    mean, std = torch.tensor(own["mean"]), torch.tensor(own["std"])
    assert not torch.allclose(mean, torch.tensor([0.2]))  # the student's differ
    # (x / 255 - mean) / std as the teacher's own batches compute it (erde.data.pixels).
    shift = (mean.double() * 255).float().view(1, -1, 1, 1)
    scale = (1 / (std.double() * 255)).float().view(1, -1, 1, 1)
    model, _ = load_model(teacher)
    with torch.no_grad():
        expected = torch.stack(model.eval()((pixels - shift) * scale), dim=1)
    assert stored.shape == expected.shape
    assert torch.equal(stored, expected)


def cache_of(cfg):
    """The teacher cache a student of `cfg` would read (no training)."""
    import torch

    from erde.data.prepare import prepare_data, train_batches
    from erde.train.engine import teacher_outputs

    split = prepare_data(cfg)
    cpu = torch.device("cpu")
    return teacher_outputs(cfg, split, train_batches(cfg, split, cpu), cpu).cache


@pytest.mark.slow
@pytest.mark.parametrize(
    "change",
    [
        "data.mean=[0.3]",
        "data.std=[0.6]",
        "data.augment=false",
        "data.crop_padding=2",
        "data.val_size=0.3",
        "train.precision=bf16",
        "train.channels_last=true",
        "train.batch_size=64",
        "train.seed=1",
    ],
)
def test_every_setting_the_teacher_outputs_depend_on_changes_the_key(teacher, tmp_path, change):
    folder = tmp_path / "cache"
    base = student(teacher, *OWN_STATS, f"distill.teacher_cache_dir={folder}")
    fill_teacher_cache(base)
    assert cache_of(base).read(0) is not None
    other = cache_of(student(teacher, *OWN_STATS, f"distill.teacher_cache_dir={folder}", change))
    assert other.key.digest != cache_of(base).key.digest
    assert other.read(0) is None  # a miss: that student computes its own


@pytest.mark.slow
@pytest.mark.parametrize("augment", [True, False])
def test_the_key_records_the_augmentation_the_student_trains_with(teacher, tmp_path, augment):
    """The key's augmentation flag is the config's: cropped-and-flipped batches and plain ones
    give the teacher other inputs."""
    flag = f"data.augment={str(augment).lower()}"
    key = cache_of(student(teacher, f"distill.teacher_cache_dir={tmp_path}", flag)).key
    assert key.augment is augment
    assert (key.crop_padding, key.seed) == (1, 0)  # digits-student's, and train.seed's default


@pytest.mark.slow
def test_a_teacher_whose_statistics_differ_gets_another_key(teacher, tmp_path):
    """The same weights with other statistics in model.json: another teacher to its students."""
    import json
    import shutil

    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    info = json.loads((copy / "model.json").read_text())
    info["data"]["mean"] = [0.3]
    (copy / "model.json").write_text(json.dumps(info))
    folder = tmp_path / "cache"
    a = cache_of(student(teacher, f"distill.teacher_cache_dir={folder}"))
    b = cache_of(student(copy, f"distill.teacher_cache_dir={folder}"))
    assert a.key.teacher_sha256 == b.key.teacher_sha256
    assert a.key.digest != b.key.digest


def test_every_field_of_the_key_is_in_its_digest_and_its_files(tmp_path):
    """Each field changed alone: another digest, and a file of the first key is refused."""
    import dataclasses

    import torch

    from erde.distill.teacher_cache import CacheKey, TeacherCache

    base = CacheKey(
        teacher_sha256="a" * 64, teacher_mean=(0.1,), teacher_std=(0.2,), source="digits",
        train_indices_sha256="b" * 64, num_train=4, batch_size=2, mean=(0.3,), std=(0.4,),
        steps=2, augment=True, crop_padding=1, hflip=False, seed=0, precision="fp32",
        channels_last=False, device_type="cpu",
    )  # fmt: skip
    TeacherCache(tmp_path, base).write(0, torch.ones(4, 2, 3))
    assert TeacherCache(tmp_path, base).read(0) is not None

    def changed(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, int):
            return value + 1
        if isinstance(value, tuple):
            return tuple(v + 0.5 for v in value)
        return value + "x"

    for field in dataclasses.fields(CacheKey):
        other = dataclasses.replace(base, **{field.name: changed(getattr(base, field.name))})
        assert other.digest != base.digest, field.name
        assert TeacherCache(tmp_path, other).read(0) is None, field.name
        # The first key's file under the other key's name is refused too.
        moved = TeacherCache(tmp_path, other)
        moved.folder.mkdir(parents=True, exist_ok=True)
        moved.path(0).write_bytes(TeacherCache(tmp_path, base).path(0).read_bytes())
        assert moved.read(0) is None, field.name
