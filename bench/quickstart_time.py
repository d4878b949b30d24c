"""Wall time of `erde quickstart` as a new user runs it, idle and beside busy processes.

    python bench/quickstart_time.py [--busy 0 1] [--repeats 3]

Each trial is one whole `erde quickstart --out TMP` process with erde's default thread policy
(no `OMP_NUM_THREADS`, no `train.threads`), timed from start to exit; the README's quickstart
time is the median of these. `--busy N` starts N processes spinning `while True: pass` before
that load's trials and stops them after (bench/threads.py's `busy_loops`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from threads import SRC, busy_loops


def trial() -> float:
    """Wall seconds of one quickstart in a fresh output folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(SRC)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "erde", "quickstart", "--out", str(Path(tmp) / "q")]
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"| busy processes | median of {args.repeats} (s) | runs (s) |")
    print("|---|---|---|")
    for busy in args.busy:
        with busy_loops(busy):
            walls = [trial() for _ in range(args.repeats)]
        runs = ", ".join(f"{w:.1f}" for w in walls)
        print(f"| {busy} | {statistics.median(walls):.1f} | {runs} |", flush=True)


if __name__ == "__main__":
    main()
