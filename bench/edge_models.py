"""Early exit on the networks engineers ship (issue 24): batch-1 latency of torchvision
MobileNetV3-Small, MobileNetV3-Large and ResNet-18 at 224 pixels, exits at their stage boundaries.

    python bench/edge_models.py --root ../shared/data/cifar10 --out runs/edge [--models ...]
        [--run CIFAR_RUN ...]

Each network is trained briefly (`--epochs`) on a CIFAR-10 subset upscaled to 224 pixels (the
first `--per-class` training and `--test-per-class` test images of every class), so its exits are
real but weak: what is measured is what an exit costs and saves at the exit distribution a
threshold gives, not accuracy. After `erde evaluate`, the thresholds timed are those of the val
curve whose expected MACs are nearest 25, 50 and 75 % of the full network's (calibrated to a known
exit distribution: weak exits put nearly every image at one exit at their own budget points), and
`erde bench RUN --int8 --batch 1` times the static graph, the early-exit graph at threshold 0
(every image to the last exit: the overhead) and at those thresholds, fp32 and int8, side by side
in rotating order, once with 1 thread and once with all cores. `--run` adds finished runs (the
CIFAR ResNet-8 student) to the same tables. Each table goes to stdout and to
OUT/<name>/bench-<threads>.md. With `--executorch` (an interpreter with `erde[executorch]`), the
trained runs are exported to ONNX and to an ExecuTorch `.pte` instead, and `erde bench --executorch`
times both at the same thresholds, to OUT/<name>/bench-executorch-<threads>.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from make_cifar_subset import first_per_class

MODELS = ("mobilenet_v3_small", "mobilenet_v3_large", "resnet18")


def erde(*args: str) -> str:
    """One erde command; its stdout (the tables) returned, its log passed through."""
    done = subprocess.run([sys.executable, "-m", "erde", *args], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"erde {' '.join(args)}: exit status {done.returncode}")
    return done.stdout


def subset(root: Path, out: Path, per_class: int, test_per_class: int) -> Path:
    """train.npz/test.npz of the first images per class (the same files every time)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_class), ("test", test_per_class)):
        with np.load(root / f"{split}.npz", allow_pickle=False) as f:
            keep = first_per_class(f["y"], n)
            np.savez(out / f"{split}.npz", x=f["x"][keep], y=f["y"][keep],
                     label_names=f["label_names"])  # fmt: skip
    return out


def train(name: str, data: Path, run: Path, epochs: int) -> None:
    if (run / "eval" / "report.json").is_file():
        return
    erde("train", "--out", str(run), "--no-progress", f"model.name=torchvision/{name}",
         "data.source=npz", f"data.root={data}", "data.image_size=224", "data.val_size=0.1",
         "distill.method=teacher", f"train.epochs={epochs}", "train.batch_size=32",
         "train.lr=0.05", "train.warmup_epochs=0", "train.channels_last=true")  # fmt: skip
    erde("evaluate", str(run))


def budget_thresholds(run: Path, fractions: tuple[float, ...] = (0.25, 0.5, 0.75)) -> str:
    """0 and the val-curve thresholds whose expected MACs are nearest each fraction of the full."""
    with (run / "eval" / "curve_val.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    macs = np.array([float(r["expected_macs"]) for r in rows])
    picks = [rows[int(np.argmin(np.abs(macs - f * macs.max())))]["threshold"] for f in fractions]
    return ",".join(["0", *dict.fromkeys(picks)])


def tables(name: str, out: Path, argv: list[str], thresholds: str, repeats: int, kind: str) -> None:
    """`erde bench ARGV` at batch 1, once with 1 thread and once with all cores: each table to
    stdout and to OUT/bench-KIND<threads>.md."""
    for threads in ("1", "0"):
        table = erde("bench", *argv, "--batch", "1", "--threads", threads,
                     "--thresholds", thresholds, "--repeats", str(repeats),
                     "--warmup", "10")  # fmt: skip
        label = "1 thread" if threads == "1" else f"all {os.cpu_count()} cores"
        print(f"\n## {name}, batch 1, {label}\n\n{table}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"bench-{kind}{threads}.md").write_text(table, encoding="utf-8")


def bench(run: Path, out: Path, repeats: int) -> None:
    tables(run.name, out, [str(run), "--int8"], budget_thresholds(run), repeats, "")


def bench_executorch(run: Path, out: Path, repeats: int) -> None:
    """The same thresholds through ExecuTorch's `.pte` beside the ONNX export of the same weights
    (needs `erde[executorch]` in this interpreter's environment)."""
    onnx, pte = out.parent / f"{run.name}-onnx", out.parent / f"{run.name}-executorch"
    specs = ((onnx, "onnx", "manifest.json"), (pte, "executorch", "executorch.json"))
    for folder, form, spec in specs:
        if not (folder / spec).is_file():
            erde("export", str(run), "--out", str(folder), "--format", form)
    argv = [str(onnx), "--executorch", str(pte)]
    name = f"{run.name}, ONNX Runtime and ExecuTorch"
    tables(name, out, argv, budget_thresholds(run), repeats, "executorch-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data/cifar10"))
    parser.add_argument("--out", type=Path, default=Path("runs/edge"))
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--run", type=Path, nargs="*", default=[], help="finished runs to add")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument(
        "--executorch",
        action="store_true",
        help="time ExecuTorch beside ONNX Runtime instead (erde[executorch])",
    )
    args = parser.parse_args()
    timed = bench_executorch if args.executorch else bench
    data = subset(args.root, args.out / "data", args.per_class, args.test_per_class)
    for name in args.models:
        train(name, data, args.out / name, args.epochs)
        timed(args.out / name, args.out / name, args.repeats)
    for run in args.run:
        timed(run, args.out / run.name, args.repeats)


if __name__ == "__main__":
    main()
