"""Wall time of one `erde infer EXPORT IMAGE` process, several erde source trees side by side.

    python bench/infer_startup.py EXPORT IMAGE before=OLD/src after=src [--repeats 9]

A one-image `erde infer` is mostly start-up: imports, manifest and graph checks, session
creation. Each repeat starts one fresh `python -m erde infer` per tree, in rotating order, so every
tree meets the same background load; the table gives the median, minimum and maximum wall time
of the whole process, and which heavy libraries the tree's `erde infer` imported. The trees must
read the same export format (a source tree of another erde version: `git archive COMMIT src`).
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
# Runs `erde infer` as `python -m erde` does, then names the heavy top-level modules it loaded.
PROBE = """
import json, runpy, sys
sys.argv = ["erde", "infer", *sys.argv[1:]]
try:
    runpy.run_module("erde", run_name="__main__")
except SystemExit as exc:
    code = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print(json.dumps(heavy), file=sys.stderr)
sys.exit(code)
"""


def _run(src: Path, args: list[str]) -> float:
    """Seconds of one `python -m erde infer ARGS` process with `src` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "erde", "infer", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - start


def _heavy(src: Path, args: list[str]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,), *args], env=env, check=True,
                          capture_output=True, text=True)  # fmt: skip
    return json.loads(done.stderr.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export")
    parser.add_argument("image")
    parser.add_argument("trees", nargs="+", metavar="LABEL=SRC")
    parser.add_argument("--repeats", type=int, default=9)
    opts = parser.parse_args()
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in opts.trees]
    args = [opts.export, opts.image, "--threads", "1"]
    for _, src in trees:  # warm the file cache once per tree, untimed
        _run(src, args)
    times: dict[str, list[float]] = {label: [] for label, _ in trees}
    for r in range(opts.repeats):
        for label, src in trees[r % len(trees) :] + trees[: r % len(trees)]:
            times[label].append(_run(src, args))
    print(f"`erde infer EXPORT one.png`, {opts.repeats} processes per tree, wall time in s\n")
    print("| tree | median | min | max | heavy libraries imported |")
    print("|---|---:|---:|---:|---|")
    for label, src in trees:
        t = times[label]
        heavy = ", ".join(_heavy(src, args)) or "none"
        print(f"| {label} | {statistics.median(t):.2f} | {min(t):.2f} | {max(t):.2f} | {heavy} |")


if __name__ == "__main__":
    main()
