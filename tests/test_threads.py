"""The CPU thread policy (erde.train.threads): the idle cores at start, unless told."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from erde.config.schema import load_config
from erde.train import threads as threads_module
from erde.train.engine import fit
from erde.train.loggers import Console
from erde.train.threads import choose_threads, cpu_times, idle_cores

# /proc/stat's first line: user nice system idle iowait irq softirq steal guest guest_nice
STAT = "cpu  {user} 0 {system} {idle} {iowait} 0 0 0 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"


def write_stat(path, user, system, idle, iowait):
    path.write_text(STAT.format(user=user, system=system, idle=idle, iowait=iowait))


def test_cpu_times_read_idle_and_total_from_a_real_stat_line(tmp_path):
    stat = tmp_path / "stat"
    write_stat(stat, user=100, system=50, idle=800, iowait=50)
    # idle counts iowait; guest (7) is inside user already and is not added again
    assert cpu_times(stat) == (850, 1000)
    assert cpu_times(tmp_path / "missing") is None
    (tmp_path / "odd").write_text("intr 1 2 3\n")
    assert cpu_times(tmp_path / "odd") is None


def test_the_real_proc_stat_is_read():
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat here")
    idle, total = cpu_times()
    assert 0 <= idle <= total
    measured = idle_cores(0.05)
    assert measured is None or 0 <= measured <= (os.cpu_count() or 1) + 1e-9


@pytest.mark.parametrize(
    ("idle", "local", "expected"),
    [(2.0, 1, 2), (1.0, 1, 1), (1.4, 1, 1), (1.6, 1, 2), (0.1, 1, 1), (2.0, 2, 1), (9.0, 1, 2)],
)
def test_auto_takes_the_idle_cores_over_the_local_processes(monkeypatch, idle, local, expected):
    """On a 2-core process: the idle cores, rounded, shared by the processes, at least 1."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads_module, "cores", lambda: 2)
    threads, why = choose_threads(0, local, idle=idle)
    assert threads == expected
    assert why == f"{min(2, round(idle))} of 2 cores idle at start"


def test_the_setting_and_omp_num_threads_override_the_idle_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(0, idle=0.0) == (3, "OMP_NUM_THREADS")
    assert choose_threads(5, idle=0.0) == (5, "train.threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a count: measured instead
    assert choose_threads(0, idle=2.0)[1].endswith("cores idle at start")


def test_fit_uses_and_logs_the_setting(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    cfg = load_config("digits-teacher", ["train.epochs=2", "train.threads=3"])
    try:
        with caplog.at_level(logging.INFO, logger="erde"):
            fit(cfg, tmp_path / "t", progress=False)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert "3 CPU thread(s) (train.threads)" in (tmp_path / "t" / "train.log").read_text()


def test_a_negative_setting_is_refused_in_one_line(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "erde",
            "train",
            "digits-teacher",
            "train.threads=-1",
            "--out",
            str(tmp_path / "t"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "train.threads" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "t").exists()


def test_time_left_follows_the_median_epoch_not_the_last(caplog):
    console = Console(epochs=5)
    row = {"train/loss": 1.0, "val/acc/1": 0.5, "images_per_s": 10.0}
    with caplog.at_level(logging.INFO, logger="erde"):
        for epoch, seconds in ((1, 60.0), (2, 60.0), (3, 600.0)):  # a busy neighbour in epoch 3
            console.log({**row, "epoch": epoch, "epoch_s": seconds})
    last = caplog.records[-1].getMessage()
    assert last.endswith("about 2.0 min left")  # 2 epochs x the median 60 s, not 2 x 600 s
