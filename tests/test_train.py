"""The training engine end to end on digits: learning, resume, determinism, refusals."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import erde.train.engine
from erde.cli.main import main
from erde.config.schema import load_config
from erde.distill.losses import LossResult
from erde.errors import ErdeError
from erde.run.metrics import read_jsonl
from erde.train.engine import fit
from erde.train.optim import lr_factor

FAST = ["model.name=resnet8", "train.batch_size=128", "train.lr=0.1", "data.crop_padding=1"]


def cfg(*overrides):
    return load_config("digits-student", [*FAST, *overrides])


def weights(run):
    return load_file(str(run / "model.safetensors"))


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "teacher"
    row = fit(load_config("digits-teacher", [*FAST, "train.epochs=8"]), run, progress=False)
    return run, row


@pytest.mark.slow
def test_teacher_and_erde_student_learn_every_exit(teacher, tmp_path):
    run, trow = teacher
    srow = fit(
        cfg("train.epochs=8", "distill.method=erde", f"distill.teacher={run}"),
        tmp_path / "erde",
        progress=False,
    )
    # Chance is 0.10; measured (seeds 0, 1): teacher 0.97-0.99 and student 0.95-0.99 per exit.
    for row in (trow, srow):
        accs = [v for k, v in row.items() if k.startswith("val/acc/")]
        assert len(accs) == 3
        assert min(accs) > 0.8, row
    # The ERDE term really ran: the teacher is wrong on some training images, and the entropy
    # component is positive exactly because of them.
    wrong = [srow[f"train/teacher_wrong/{i}"] for i in range(1, 4)]  # exits 1..n
    assert all(0 < w < 0.5 for w in wrong)
    assert srow["train/entropy"] > 0
    meta = json.loads((tmp_path / "erde" / "model.json").read_text())
    assert meta["finished"] and meta["method"] == "erde" and meta["teacher"] == str(run)
    assert meta["exit_macs"] == sorted(meta["exit_macs"]) and len(meta["pairing"]) == 3


@pytest.mark.slow
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    fit(cfg("train.epochs=2"), tmp_path / "straight", progress=False)
    # Same run, stopped after epoch 1: a 1-epoch run's state is not the same (its schedule ends
    # at epoch 1), so interrupt the 2-epoch run by hand: train 2 epochs' config for 1 epoch.
    interrupted = tmp_path / "interrupted"
    fit(cfg("train.epochs=2"), interrupted, progress=False, stop_after=1)
    assert json.loads((interrupted / "model.json").read_text())["epoch"] == 1
    fit(None, interrupted, resume=True, progress=False)
    a, b = weights(tmp_path / "straight"), weights(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = [
        {k: v for k, v in r.items() if k not in ("epoch_s", "images_per_s")}
        for r in read_jsonl(interrupted / "metrics.jsonl")
    ]
    assert strip == [
        {k: v for k, v in r.items() if k not in ("epoch_s", "images_per_s")}
        for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    ]


def test_metrics_rows_are_appended_and_a_resume_drops_rows_its_state_never_saw(tmp_path):
    run = tmp_path / "run"
    inodes = []  # the same file grows: a rewrite would replace it (a new inode) every epoch
    fit(cfg("train.epochs=3"), run, progress=False, stop_after=2,
        on_epoch=lambda row: inodes.append((run / "metrics.jsonl").stat().st_ino))  # fmt: skip
    assert len(inodes) == 2 and inodes[0] == inodes[1]
    saved = (run / "metrics.jsonl").read_text().splitlines()
    # Killed after appending epoch 3's row, before its state, and again mid-line.
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(saved[-1].replace('"epoch": 2', '"epoch": 3') + "\n" + saved[0][:17])
    state = torch.load(run / "state.pt", weights_only=True)
    state["epoch"] = 1  # and the state is epoch 1's: the rows of epochs 2 and 3 run again
    torch.save(state, run / "state.pt")
    fit(None, run, resume=True, progress=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == saved[0]
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


@pytest.mark.slow
def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, capsys):
    one_epoch = cfg("train.epochs=1", "train.warmup_epochs=0")
    fit(one_epoch, tmp_path / "straight", progress=False)
    # Killed in epoch 1, inside its first weights write: the config and a half-written temporary.
    run = tmp_path / "killed"
    run.mkdir()
    (run / "config.yaml").write_bytes((tmp_path / "straight" / "config.yaml").read_bytes())
    leftover = run / ".model.safetensors.0a1b2c3d.tmp"
    leftover.write_bytes(b"\0" * 4096)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".epoch0001.safetensors.9f8e7d6c.tmp").write_bytes(b"\0")
    mine = run / ".notes.tmp"  # not erde's: kept
    mine.write_text("mine")

    code, _, err = run_cli(capsys, "train", "--resume", "--out", str(run), "--no-progress")
    assert code == 0, err
    a, b = weights(tmp_path / "straight"), weights(run)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert json.loads((run / "model.json").read_text())["finished"]
    assert not leftover.exists() and list((run / "checkpoints").iterdir()) == []
    assert mine.read_text() == "mine"


@pytest.mark.slow
def test_resume_removes_the_temporaries_of_interrupted_writes(tmp_path):
    run = tmp_path / "r"
    fit(cfg("train.epochs=2"), run, progress=False, stop_after=1)
    leftover = run / ".state.pt.00ff00ff.tmp"  # as large as a state: worth deleting
    leftover.write_bytes((run / "state.pt").read_bytes())
    fit(None, run, resume=True, progress=False)
    assert not leftover.exists()
    assert json.loads((run / "model.json").read_text())["epoch"] == 2


@pytest.mark.slow
def test_a_folder_killed_while_writing_its_config_takes_a_new_run(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / ".config.yaml.12345678.tmp").write_text("data:\n  sour")
    fit(cfg("train.epochs=1", "train.warmup_epochs=0"), run, progress=False)
    assert json.loads((run / "model.json").read_text())["finished"]
    assert not list(run.glob(".*.tmp"))


@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    rows = [
        fit(
            cfg("train.epochs=1", "train.warmup_epochs=0", f"train.seed={s}"),
            tmp_path / f"r{i}",
            progress=False,
        )
        for i, s in enumerate((3, 3, 4))
    ]
    drop = ("epoch_s", "images_per_s")
    same = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert same[0] == same[1]
    assert same[0] != same[2]


def test_lr_schedule_warmup_cosine_multistep():
    c = cfg("train.epochs=4", "train.warmup_epochs=1")
    steps = 10
    assert lr_factor(c.train, 0, steps) == pytest.approx(0.1)
    assert lr_factor(c.train, 9, steps) == pytest.approx(1.0)
    assert lr_factor(c.train, 10, steps) == pytest.approx(1.0)
    assert lr_factor(c.train, 25, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
    m = cfg(
        "train.epochs=4",
        "train.schedule=multistep",
        "train.milestones=[0.5,0.75]",
        "train.gamma=0.1",
    )
    assert [lr_factor(m.train, s, steps) for s in (19, 20, 29, 30)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.01]
    )


@pytest.mark.slow
def test_finished_run_is_not_replaced_without_overwrite(teacher, capsys):
    run, _ = teacher
    before = (run / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "train", "digits-teacher", "--out", str(run))
    assert code == 2
    assert "already holds a finished run" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert (run / "model.safetensors").read_bytes() == before


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}  # fmt: skip


@pytest.mark.slow
def test_overwrite_never_deletes_files_erde_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"  # the reproduction: a config.yaml among the user's files
    (mine / "src").mkdir(parents=True)
    (mine / "config.yaml").write_text("lr: 1\n")
    (mine / "data.txt").write_text("x\n")
    (mine / "src" / "a.py").write_text("print()\n")
    before = tree(mine)
    one = ["model.name=resnet8", "train.epochs=1", "train.warmup_epochs=0", "--no-progress"]
    code, _, err = run_cli(capsys, "train", "digits-student", *one, "--overwrite",
                           "--out", str(mine))  # fmt: skip
    assert code == 2 and "files erde did not write (data.txt, src)" in err
    assert len(err.strip().splitlines()) == 1
    assert tree(mine) == before

    run = tmp_path / "run"  # a real run with its evaluation is erde's own: replaced
    assert run_cli(capsys, "train", "digits-teacher", *one, "--out", str(run))[0] == 0
    assert run_cli(capsys, "evaluate", str(run))[0] == 0
    assert run_cli(capsys, "train", "digits-teacher", *one, "--overwrite",
                   "--out", str(run))[0] == 0  # fmt: skip
    assert not (run / "eval").exists()

    (run / "notes.md").write_text("mine\n")  # ... until the user puts a file of theirs in it
    before = tree(run)
    code, _, err = run_cli(capsys, "train", "digits-teacher", *one, "--overwrite",
                           "--out", str(run))  # fmt: skip
    assert code == 2 and "(notes.md)" in err
    assert tree(run) == before


@pytest.mark.slow
def test_resume_refuses_a_teacher_replaced_since_the_run_began(teacher, tmp_path):
    mine = tmp_path / "teacher"
    shutil.copytree(teacher[0], mine)
    student = tmp_path / "student"
    kd = cfg("distill.method=kd", f"distill.teacher={mine}", "train.epochs=2")
    fit(kd, student, progress=False, stop_after=1)
    other = ["train.epochs=1", "train.warmup_epochs=0", "train.seed=5"]
    fit(load_config("digits-teacher", [*FAST, *other]), mine, overwrite=True, progress=False)
    with pytest.raises(ErdeError, match="has other weights than when this run started"):
        fit(None, student, resume=True, progress=False)
    assert json.loads((student / "model.json").read_text())["epoch"] == 1


@pytest.mark.slow
def test_overwrite_never_deletes_the_teacher(teacher, tmp_path, capsys):
    run, _ = teacher
    before = tree(run)
    argv = ["digits-student", "distill.method=kd", f"distill.teacher={run}", "--overwrite"]
    code, _, err = run_cli(capsys, "train", *argv, "--out", str(run))
    assert code == 2 and "which --overwrite would delete" in err
    assert tree(run) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "teacher_arg, message",
    [
        ("missing", "does not exist"),
        ("corrupt", "not a readable safetensors file"),
    ],
)
def test_bad_teacher_is_refused(tmp_path, capsys, teacher, teacher_arg, message):
    if teacher_arg == "corrupt":
        bad = tmp_path / "corrupt"
        bad.mkdir()
        src, _ = teacher
        for name in ("model.json", "config.yaml"):
            (bad / name).write_bytes((src / name).read_bytes())
        (bad / "model.safetensors").write_bytes(b"not a safetensors file at all")
    code, _, err = run_cli(
        capsys,
        "train",
        "digits-student",
        *FAST,
        "distill.method=erde",
        f"distill.teacher={tmp_path / teacher_arg}",
        "--out",
        str(tmp_path / "student"),
    )
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.slow
def test_teacher_trained_on_other_data_is_refused(teacher, tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "npz"
    root.mkdir()
    for split, n in (("train", 60), ("test", 20)):
        np.savez(
            root / f"{split}.npz",
            x=rng.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8),
            y=np.arange(n) % 3,
        )
    run, _ = teacher
    code, _, err = run_cli(
        capsys,
        "train",
        "digits-student",
        *FAST,
        "data.source=npz",
        f"data.root={root}",
        "data.val_size=0.2",
        "train.batch_size=16",  # below the 48 training images
        "distill.method=kd",
        f"distill.teacher={run}",
        "--out",
        str(tmp_path / "student"),
    )
    assert code == 2 and "same data source" in err


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "blowup"
    # Epoch 1 trains normally; from epoch 2 the loss is NaN (no valid setting makes it so:
    # momentum >= 1 and a growing learning rate are refused by the config).
    real_epoch = erde.train.engine.train_epoch

    def blowing_up(p, epoch):
        if epoch == 1:
            loss_fn = p.loss_fn
            p.loss_fn = lambda *args: LossResult(
                loss_fn(*args).total * float("nan"), loss_fn(*args).components
            )
        return real_epoch(p, epoch)

    monkeypatch.setattr(erde.train.engine, "train_epoch", blowing_up)
    code, _, err = run_cli(
        capsys, "train", "digits-student", *FAST, "train.epochs=2", "--out", str(run),
        "--no-progress",
    )  # fmt: skip
    assert code == 2
    assert "NaN or infinite at epoch 2, step" in err
    for key in ("train.lr", "train.momentum", "train.warmup_epochs", "distill.beta"):
        assert key in err  # the keys that can cause it, not only the learning rate
    assert json.loads((run / "model.json").read_text())["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in weights(run).values())
    assert len(read_jsonl(run / "metrics.jsonl")) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train.epochz=3"], "train.epochz"),
        (["train.epochs=three"], "train.epochs"),
        (["distill.method=magic"], "distill.method='magic' is not a registered method"),
        (["distill.method=erde"], "needs a teacher"),
        (["train.epochs"], "not of the form key=value"),
        (["distill.alpha=2"], "distill.alpha=2.0 must lie in [0, 1]"),
    ],
)
def test_config_mistakes_name_the_key(tmp_path, capsys, argv, message):
    code, _, err = run_cli(capsys, "train", "digits-student", *argv, "--out", str(tmp_path / "r"))
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_resume_with_a_different_config_is_refused(tmp_path, capsys):
    run = tmp_path / "r"
    fit(cfg("train.epochs=2"), run, progress=False, stop_after=1)
    code, _, err = run_cli(
        capsys,
        "train",
        "digits-student",
        *FAST,
        "train.epochs=2",
        "train.lr=0.2",
        "--resume",
        "--out",
        str(run),
    )
    assert code == 2 and "train.lr" in err
