"""Wall time of one `erde COMMAND ...` process, several erde source trees side by side.

    python bench/startup.py before=OLD/src after=src [--repeats 9] -- COMMAND ARGS...

For a short command (a one-image `erde infer`, a refusal) this is mostly start-up: imports,
checks, session creation. Each repeat starts one fresh `python -m erde COMMAND ARGS` per tree, in
rotating order, so every tree meets the same background load; the table gives the median, minimum
and maximum wall time of the whole process, its exit status, and which heavy libraries it
imported. The trees must read the same files (a source tree of another erde version:
`git archive COMMIT src`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "torchvision", "optuna", "matplotlib", "omegaconf", "scipy", "onnx")
# Runs `erde ARGS` as `python -m erde` does, then names the heavy top-level modules it loaded.
PROBE = """
import json, runpy, sys
sys.argv = ["erde", *sys.argv[1:]]
try:
    runpy.run_module("erde", run_name="__main__")
except SystemExit as exc:
    code = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print(json.dumps(heavy), file=sys.stderr)
sys.exit(code)
"""


def _run(src: Path, args: list[str]) -> tuple[float, int]:
    """Seconds and exit status of one `python -m erde ARGS` process with `src` first on the
    path (a refusal, status 2, is as fair a measurement as a success)."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "erde", *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start, done.returncode


def _heavy(src: Path, args: list[str]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,), *args], env=env,
                          capture_output=True, text=True)  # fmt: skip
    return json.loads(done.stderr.strip().splitlines()[-1])


def main() -> None:
    ours, args = sys.argv[1:], []
    if "--" in ours:
        ours, args = ours[: ours.index("--")], ours[ours.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs="+", metavar="LABEL=SRC")
    parser.add_argument("--repeats", type=int, default=9)
    opts = parser.parse_args(ours)
    if not args:
        parser.error("give the erde command after --, e.g. -- infer EXPORT one.png --threads 1")
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in opts.trees]
    for _, src in trees:  # warm the file cache once per tree, untimed
        _run(src, args)
    times: dict[str, list[float]] = {label: [] for label, _ in trees}
    status: dict[str, set[int]] = {label: set() for label, _ in trees}
    for r in range(opts.repeats):
        for label, src in trees[r % len(trees) :] + trees[: r % len(trees)]:
            seconds, code = _run(src, args)
            times[label].append(seconds)
            status[label].add(code)
    print(f"`erde {' '.join(args)}`, {opts.repeats} processes per tree, wall time in s\n")
    print("| tree | median | min | max | exit status | heavy libraries imported |")
    print("|---|---:|---:|---:|---|---|")
    for label, src in trees:
        t = times[label]
        heavy = ", ".join(_heavy(src, args)) or "none"
        codes = "/".join(map(str, sorted(status[label])))
        print(f"| {label} | {statistics.median(t):.2f} | {min(t):.2f} | {max(t):.2f} | {codes} "
              f"| {heavy} |")  # fmt: skip


if __name__ == "__main__":
    main()
