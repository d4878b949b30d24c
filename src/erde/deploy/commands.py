"""`erde export`, `erde infer` and `erde bench`: argument parsing and printing only.

`add_commands(sub, command)` registers them on the CLI's sub-parsers through its `command`
helper; every handler is one call into `erde.deploy`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from erde.deploy.onnx_export import OPSET, OPSETS
from erde.errors import ErdeError


def export_command(args: argparse.Namespace) -> None:
    from erde.deploy.export import export_run

    m = export_run(
        args.run,
        args.out,
        threshold=args.threshold,
        policy=args.policy,
        normalize=args.normalize,
        opset=args.opset,
        int8=args.int8,
        overwrite=args.overwrite,
    )
    files = ", ".join(p["file"] for p in m["pieces"])
    print(
        f"exported {m['model']} ({m['precision']}, ONNX opset {m['opset']}) from {args.run} to "
        f"{args.out}: {files} (one per exit), {m['single']['file']} (one call per image) and "
        f"{m['static']['file']} (no early exit)"
    )
    if m["quantization"] is not None:
        accuracy = m["quantization"]["per_exit_accuracy"]["val"]
        print("int8 val accuracy per exit: " + " / ".join(f"{100 * a:.2f}" for a in accuracy))
    print(
        f"policy {m['policy']}{' (normalised)' if m['normalize'] else ''}, threshold "
        f"{m['threshold']:.4g} ({m['threshold_source']})"
    )


def infer_command(args: argparse.Namespace) -> None:
    from erde.deploy.runtime import EarlyExitRuntime
    from erde.report import markdown_table

    runtime = EarlyExitRuntime.from_export(args.export, threads=args.threads)
    rows = runtime.classify_files(args.images, threshold=args.threshold, form=args.form)
    print(
        markdown_table(
            ["file", "class", "exit", "confidence"],
            [
                [r.file, r.class_name, r.exit, f"{r.confidence:.4f}"]
                if r.error is None
                else [r.file, "error", "-", r.error]
                for r in rows
            ],
        ),
        end="",
    )
    failures = [r for r in rows if r.error is not None]
    if failures:
        first = failures[0]
        raise ErdeError(
            f"{len(failures)} of {len(rows)} image(s) could not be classified (their rows say "
            f"why; the first, {first.file}: {first.error}); fix or remove those files"
        )


def bench_command(args: argparse.Namespace) -> None:
    from erde.deploy.latency import benchmark, render_benchmark

    result = benchmark(
        args.target,
        reference=args.reference,
        thresholds=args.thresholds,
        batch_sizes=args.batch,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads or None,
        int8=args.int8,
        form=args.form,
    )
    print(render_benchmark(result), end="")


def _number_list(kind: type) -> Callable[[str], list]:
    """An argparse `type=` for `--thresholds 0.5,1` and `--batch 1,8`: erde's one comma list."""
    from erde.comma_list import comma_list_type

    return comma_list_type(kind)


def add_commands(sub: argparse._SubParsersAction, command: Callable) -> None:
    """Register export, infer and bench on the CLI's sub-parsers `sub`, each through the
    CLI's `command(name, func, help)` helper, which creates it on `sub`."""
    p = command(
        "export", export_command, "export a run as ONNX pieces that stop at the first sure exit"
    )
    p.add_argument("run", help="finished run folder")
    p.add_argument("--out", required=True, help="export folder to write")
    p.add_argument(
        "--threshold",
        type=float,
        help="exit threshold (default: the one `erde evaluate` calibrated on val)",
    )
    p.add_argument(
        "--policy",
        choices=("entropy", "maxprob"),
        help="default: the policy of the run's evaluation report, else entropy",
    )
    p.add_argument(
        "--normalize", action="store_true", default=None, help="entropy divided by log K"
    )
    p.add_argument(
        "--opset",
        type=int,
        default=OPSET,
        help=f"ONNX opset, {OPSETS[0]}-{OPSETS[-1]} (default {OPSET})",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="static int8 (QDQ, per-channel) calibrated on val; threshold re-chosen on it",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty folder that is no export"
    )

    p = command("infer", infer_command, "classify image files with an exported early-exit model")
    p.add_argument("export", metavar="DIR", help="folder written by `erde export`")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, ... files")
    p.add_argument("--threshold", type=float, help="override the export's threshold")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all)")
    _form_argument(p)

    add_bench_arguments(
        command(
            "bench", bench_command, "latency of early exit against the static student and teacher"
        )
    )


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `erde bench` (also used by bench/latency.py)."""
    p.add_argument("target", metavar="RUN|DIR", help="run folder or `erde export` folder")
    p.add_argument("--reference", metavar="TEACHER_RUN", help="also time this run, statically")
    p.add_argument(
        "--thresholds",
        type=_number_list(float),
        help="comma list (default: 0, the val-calibrated budget points and the calibrated one)",
    )
    p.add_argument(
        "--batch", type=_number_list(int), default=[1, 64], help="batch sizes (default 1,64)"
    )
    p.add_argument("--repeats", type=int, default=100, help="timed batches per batch size")
    p.add_argument("--warmup", type=int, default=10, help="untimed batches first")
    p.add_argument(
        "--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0: all; default 1)"
    )
    p.add_argument(
        "--int8", action="store_true", help="also export the run as int8 and time it (a run only)"
    )
    _form_argument(p)


def _form_argument(p: argparse.ArgumentParser) -> None:
    from erde.deploy.runtime import FORMS

    p.add_argument(
        "--form",
        choices=FORMS,
        default="auto",
        help="early exit in one call per image (single), split batches (split), or single for "
        "batch 1 and split above (auto, default)",
    )
