"""Training speed of the CPU thread policies, idle and beside busy processes, side by side.

    python bench/threads.py [--busy 0 1] [--repeats 3] [--epochs 6]

Each trial is one `erde train digits-teacher train.epochs=E` process; its speed is the median
images/s over its epochs (metrics.jsonl), and the process's wall time is kept too. Candidates:

- `1 thread`:  train.threads=1
- `all cores`: train.threads=<cores> (PyTorch's own default)
- `all cores, passive`: the same with OMP_WAIT_POLICY=PASSIVE (threads sleep at barriers)
- `auto`: train.threads=0, erde's default: the cores idle at start

For each background load (`--busy N`: N processes spinning `while True: pass`, started before
and stopped after that load's trials), the candidates run `--repeats` times in rotating order so
each meets the same neighbours. The table gives medians and each candidate's ratio to the
fastest one under that load; the machine's other load is not controlled (say so with the table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def candidates(cores: int) -> dict[str, tuple[str, dict[str, str]]]:
    """name -> (train.threads value, extra environment)."""
    return {
        "1 thread": ("1", {}),
        "all cores": (str(cores), {}),
        "all cores, passive": (str(cores), {"OMP_WAIT_POLICY": "PASSIVE"}),
        "auto (default)": ("0", {}),
    }


def trial(threads: str, extra: dict[str, str], epochs: int) -> tuple[float, float, str]:
    """(median images/s, wall seconds, the thread choice the run logged) of one training."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(extra, PYTHONPATH=str(SRC))
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "t"
        cmd = [
            sys.executable,
            "-m",
            "erde",
            "train",
            "digits-teacher",
            f"train.epochs={epochs}",
            f"train.threads={threads}",
            "--out",
            str(run),
            "--no-progress",
        ]
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        chose = next(
            line.split(", ")[-1]
            for line in (run / "train.log").read_text().splitlines()
            if "CPU thread(s)" in line
        )
    return statistics.median(r["images_per_s"] for r in rows), wall, chose


@contextmanager
def busy_loops(n: int) -> Iterator[None]:
    """n processes spinning `while True: pass` for the duration: a controlled background load."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(1.0)
        yield
    finally:
        for s in spinners:
            s.kill()
            s.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    names = candidates(cores)
    print(
        f"| busy processes | candidate | images/s (median of {args.repeats}) | range | wall s "
        "| vs fastest | thread choice logged |"
    )
    print("|---|---|---|---|---|---|---|")
    for busy in args.busy:
        with busy_loops(busy):
            speeds: dict[str, list[float]] = {n: [] for n in names}
            walls: dict[str, list[float]] = {n: [] for n in names}
            chosen: dict[str, str] = {}
            order = list(names)
            for r in range(args.repeats):
                for name in order[r % len(order) :] + order[: r % len(order)]:
                    speed, wall, chose = trial(*names[name], args.epochs)
                    speeds[name].append(speed)
                    walls[name].append(wall)
                    chosen[name] = chose
        best = max(statistics.median(v) for v in speeds.values())
        for name in names:
            med = statistics.median(speeds[name])
            print(
                f"| {busy} | {name} | {med:,.0f} | {min(speeds[name]):,.0f}-"
                f"{max(speeds[name]):,.0f} | {statistics.median(walls[name]):.1f} | "
                f"{med / best:.2f} | {chosen[name]} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
