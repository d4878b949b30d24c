"""Progress a person can follow: one line per epoch on stdout, plain lines without a terminal."""

import json
import logging
import subprocess
import sys

import pytest

from erde.cli.main import main
from erde.logs import Heartbeat
from erde.train import engine as train


def test_heartbeat_is_due_once_per_period():
    beat = Heartbeat(every_s=3600)
    assert not beat.due()
    assert Heartbeat(every_s=0).due()


@pytest.mark.slow
def test_piped_output_has_one_plain_line_per_epoch(tmp_path):
    # As `erde train ... | cat`: stdout is a pipe, so no bar, and every epoch is a plain line.
    cmd = [sys.executable, "-m", "erde", "train", "digits-teacher", "train.epochs=2"]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "t")], capture_output=True, text=True, check=True
    )
    lines = done.stdout.splitlines()
    # A slow (loaded) machine adds "epoch i of n: step ..." heartbeat lines between them.
    epochs = [line for line in lines if ": train loss " in line]
    assert len(epochs) == 2
    assert epochs[0].startswith("epoch 1 of 2: train loss ") and "min left" in epochs[0]
    assert "val accuracy per exit (%) " in epochs[1] and " img/s" in epochs[1]
    assert "exit 1:" in lines[-1]  # the final line numbers exits from 1
    assert "\r" not in done.stdout + done.stderr  # no bar redrawn into a log


@pytest.mark.slow
@pytest.mark.parametrize("no_progress", [False, True])
def test_step_lines_without_a_terminal_unless_no_progress(
    tmp_path, monkeypatch, caplog, no_progress
):
    monkeypatch.setattr(train, "Heartbeat", lambda: Heartbeat(every_s=0))  # due at every check
    out_dir = tmp_path / "t"
    argv = ["train", "digits-teacher", "train.epochs=2", "--out", str(out_dir)]
    with caplog.at_level(logging.INFO, logger="erde"):
        assert main(argv + ["--no-progress"] * no_progress) == 0
    steps = [r.getMessage() for r in caplog.records if ": step " in r.getMessage()]
    assert bool(steps) is not no_progress
    assert all(s.startswith(("epoch 1 of 2: step ", "epoch 2 of 2: step ")) for s in steps)
    # Exits are numbered 1..n on disk too: every per-exit key of the 3-exit teacher ends in 1-3.
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        numbered = sorted(k for k in json.loads(line) if k.rsplit("/", 1)[-1].isdigit())
        families = {k.rsplit("/", 1)[0] for k in numbered}
        assert families == {
            "val/acc",
            "train/ce",
            "train/kl",
            "train/entropy",
            "train/teacher_wrong",
        }
        assert numbered == sorted(f"{f}/{i}" for f in families for i in (1, 2, 3))


def _quick_train(cfg, run) -> None:
    run.mkdir()


def test_serial_runs_say_how_long_the_rest_will_take(tmp_path, caplog):
    from erde.study.parallel import run_serial

    runs = [(None, tmp_path / f"r{i}") for i in range(3)]
    with caplog.at_level(logging.INFO, logger="erde"):
        assert run_serial(_quick_train, runs) == []
    lines = [r.getMessage() for r in caplog.records if ": run " in r.getMessage()]
    assert lines[0] == "r0: run 1 of 3"  # nothing to estimate from yet
    assert [line.split(",")[0] for line in lines[1:]] == ["r1: run 2 of 3", "r2: run 3 of 3"]
    assert all(line.endswith(" min left") for line in lines[1:])


def _stderr_on_a_terminal(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd` with stderr on an 80-column pseudo-terminal (as in a shell; tqdm draws nothing
    on a terminal 0 columns wide); its exit status and stderr."""
    import fcntl
    import os
    import struct
    import termios
    import threading

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the terminal closed: the process is gone
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=slave, timeout=300)
    os.close(slave)
    reader.join(timeout=30)
    os.close(master)
    return done.returncode, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_export_draws_a_bar_over_its_graphs_on_a_terminal_only(teacher, tmp_path):
    cmd = [sys.executable, "-m", "erde", "export", str(teacher), "--threshold", "0.5"]
    status, shown = _stderr_on_a_terminal([*cmd, "--out", str(tmp_path / "tty")])
    assert status == 0
    graphs = len(json.loads((tmp_path / "tty" / "manifest.json").read_text())["pieces"])
    assert "export graphs" in shown and f"{graphs + 1}/{graphs + 1}" in shown  # pieces + static
    piped = subprocess.run([*cmd, "--out", str(tmp_path / "pipe")], capture_output=True, text=True)
    assert piped.returncode == 0 and "export graphs" not in piped.stderr
