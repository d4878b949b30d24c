"""`erde export`, `erde infer` and `erde bench`: argument parsing and printing only.

`add_commands(sub, command)` registers them on the CLI's sub-parsers through its `command`
helper; every handler is one call into `erde.deploy`. Nothing heavy (PyTorch, ONNX) is imported
until a handler runs, so `erde --help` stays fast; the two choices the parser needs from those
modules are spelled out here and tests/test_help.py checks them against their source.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from erde.cli.numbers import whole_number
from erde.device import cores
from erde.errors import ErdeError
from erde.files import jsonable

if TYPE_CHECKING:  # the CLI imports nothing heavy before a handler runs
    from erde.deploy.latency import Benchmark

OPSET_HELP = "ONNX opset, 18-20 (default: 18)"  # erde.deploy.onnx_export.OPSETS and OPSET
FORMS = ("auto", "single", "split")  # erde.deploy.runtime.FORMS
INFER_FORMATS = ("table", "json", "csv")
# The fields of one `erde infer` result, in the order of the JSON objects and CSV columns.
INFER_FIELDS = ("file", "class_index", "class_name", "confidence", "exit", "error", "warning")
PRINTED = ("file", "class_name", "error", "warning")  # the text fields, names of files in them
_UNDECODED = re.compile("[\udc80-\udcff]")  # os.fsdecode's stand-ins for bytes no UTF-8


POLICY_HELP = "exit score: entropy, maxprob, margin or a plugin's (--policy-module)"


def add_policy_module(p: argparse.ArgumentParser) -> None:
    """The option that imports a plugin's exit policies (README, "Your own exit rule")."""
    p.add_argument(
        "--policy-module",
        metavar="MODULE",
        help="Python module that registers --policy with erde.register_policy (default: none; "
        "the built-ins and installed erde.policies entry points need none)",
    )


def import_policy_module(args: argparse.Namespace) -> None:
    from erde.evaluation.policies import import_policy_module

    import_policy_module(args.policy_module)


def export_command(args: argparse.Namespace) -> None:
    if args.format == "executorch":
        return executorch_export_command(args)
    from erde.deploy.export import export_run
    from erde.deploy.manifest import DEPLOY_MD, MANIFEST
    from erde.deploy.onnx_export import OPSET

    import_policy_module(args)
    m = export_run(
        args.run,
        args.out,
        threshold=args.threshold,
        policy=args.policy,
        normalize=args.normalize,
        opset=OPSET if args.opset is None else args.opset,
        int8=args.int8,
        overwrite=args.overwrite,
    )
    files = ", ".join(p["file"] for p in m.pieces)
    print(
        f"exported {m.info.name} ({m.precision}, ONNX opset {m.opset}) from {args.run} to "
        f"{args.out}: {files} (one per exit), {m.single['file']} (one call per image) and "
        f"{m.static['file']} (no early exit); {DEPLOY_MD} and {MANIFEST} say how to feed and "
        "run them"
    )
    if m.quantization is not None:
        accuracy = m.quantization["per_exit_accuracy"]["val"]
        print("int8 val accuracy per exit: " + " / ".join(f"{100 * a:.2f}" for a in accuracy))
    d = m.deployment
    print(
        f"policy {d.policy}{' (normalised)' if d.normalize else ''}, threshold "
        f"{d.threshold:.4g} ({d.threshold_source})"
    )


def executorch_export_command(args: argparse.Namespace) -> None:
    from erde.deploy.executorch_export import export_executorch

    for option, given in (("--int8", args.int8), ("--opset", args.opset is not None)):
        if given:
            raise ErdeError(f"{option} is for ONNX exports; drop it, or use --format onnx")
    spec = export_executorch(
        args.run, args.out, threshold=args.threshold, policy=args.policy, normalize=args.normalize
    )
    ops = " / ".join(f"{d['delegated_ops']}:{d['portable_ops']}" for d in spec["xnnpack"])
    print(
        f"exported {spec['model']['arch']['name']} ({spec['exporter']}) from {args.run} to "
        f"{args.out}: {spec['file']} (one call per image, a branch per exit; operators on "
        f"XNNPACK:portable per piece {ops})\npolicy {spec['policy']}"
        f"{' (normalised)' if spec['normalize'] else ''}, threshold {spec['threshold']:.4g} "
        f"({spec['threshold_source']})"
    )


def infer_command(args: argparse.Namespace) -> None:
    from erde.deploy.executorch_files import is_executorch_export
    from erde.deploy.images import image_paths
    from erde.deploy.runtime import EarlyExitRuntime

    paths = image_paths(args.images)  # a pattern that matches nothing fails before loading
    if is_executorch_export(args.export):
        from erde.deploy.executorch_runtime import ExecuTorchRuntime

        runtime = ExecuTorchRuntime(args.export)
    else:
        runtime = EarlyExitRuntime.from_export(args.export, threads=args.threads)
    threshold = args.threshold
    if args.budget is not None:
        threshold = _budget_threshold(args)
    elif args.latency_budget is not None:
        threshold = _latency_threshold(args, runtime)
    rows = runtime.classify_files(paths, threshold=threshold, form=args.form)
    rows = [dataclasses.replace(r, **{k: printable(getattr(r, k)) for k in PRINTED}) for r in rows]
    for r in rows:
        if r.warning is not None:
            print(f"erde infer: warning: {r.warning}", file=sys.stderr)
    print(render_results(rows, args.format), end="")
    failures = [r for r in rows if r.error is not None]
    if failures:
        first = failures[0]
        raise ErdeError(
            f"{len(failures)} of {len(rows)} image(s) could not be classified (their rows say "
            f"why; the first, {first.file}: {first.error}); fix or remove those files"
        )


def _budget_threshold(args: argparse.Namespace) -> float:
    """`--budget`: the threshold the export's val curve gives for it, said on stderr."""
    from erde.deploy.curve import choose_threshold
    from erde.deploy.manifest import read_manifest

    point = choose_threshold(read_manifest(args.export), args.budget)
    print(
        f"erde infer: budget {args.budget:g}: threshold {point['threshold']:.6g} from the "
        f"export's val curve (val accuracy {100 * point['val_accuracy']:.2f} %, "
        f"{point['expected_macs']:.6g} MACs per image on val)",
        file=sys.stderr,
    )
    return point["threshold"]


def _latency_threshold(args: argparse.Namespace, runtime) -> float:
    """`--latency-budget`: each exit timed here, then the val curve's point within it."""
    from erde.deploy.latency_budget import (
        check_latency_budget,
        choose_for_latency,
        exit_latencies,
    )
    from erde.deploy.manifest import read_manifest
    from erde.deploy.runtime import EarlyExitRuntime

    if not isinstance(runtime, EarlyExitRuntime):
        raise ErdeError("--latency-budget is for ONNX exports; use --budget (MACs) here")
    manifest = read_manifest(args.export)
    check_latency_budget(manifest, args.latency_budget)
    latencies = exit_latencies(runtime)
    point = choose_for_latency(manifest, latencies, args.latency_budget)
    measured = " / ".join(f"{1000 * s:.3g}" for s in latencies)
    print(
        f"erde infer: latency budget {args.latency_budget:g} ms: threshold "
        f"{point['threshold']:.6g} from the export's val curve (val accuracy "
        f"{100 * point['val_accuracy']:.2f} %, expected {point['expected_ms']:.3g} ms per image "
        f"from exits measured here at {measured} ms, batch 1)",
        file=sys.stderr,
    )
    return point["threshold"]


def printable(text: str | None) -> str | None:
    """Text as stdout can show it: a file name's bytes that are no UTF-8 (which Python keeps as
    lone surrogates, PEP 383, and a strict UTF-8 stdout refuses) as \\xNN, as does anything
    else stdout's encoding cannot write."""
    if text is None:
        return None
    text = _UNDECODED.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", text)
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)


def render_results(rows: Sequence, fmt: str) -> str:
    """`erde infer`'s rows (`FileResult`s) as a markdown table, one JSON list of objects, or CSV
    with a header row; JSON and CSV keep every field, with null / an empty cell where none."""
    if fmt == "json":
        return json.dumps(jsonable([{k: getattr(r, k) for k in INFER_FIELDS} for r in rows]),
                          indent=2, allow_nan=False) + "\n"  # fmt: skip
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(INFER_FIELDS)
        writer.writerows([getattr(r, k) for k in INFER_FIELDS] for r in rows)
        return out.getvalue()
    from erde.run.report import markdown_table

    return markdown_table(
        ["file", "class", "exit", "confidence"],
        [
            [r.file, r.class_name, r.exit, f"{r.confidence:.4f}"]
            if r.error is None
            else [r.file, "error", "-", r.error]
            for r in rows
        ],
    )


def bench_command(args: argparse.Namespace) -> None:
    from erde.deploy.latency import benchmark, render_benchmark

    import_policy_module(args)
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
        executorch=args.executorch,
    )
    print(render_benchmark(result), end="")
    print(bench_notes(result), end="")


def bench_notes(result: Benchmark) -> str:
    """What the table alone does not say: how many images each row timed, and why batch-1 rows
    can fall short of the MACs prediction (docs/benchmarks.md measures the causes)."""
    repeats, pool = result.repeats, result.held_out_images
    batches = sorted({r.batch for r in result.rows})
    used = ", ".join(f"{b * repeats:,} at batch {b}" for b in batches)
    reused = (
        f"; the {pool:,} test images are taken again from the start when a row needs more"
        if max(batches) * repeats > pool
        else ""
    )
    return (
        f"\nImages per row: {used} ({repeats} timed batches x batch size){reused}.\n"
        "Batch-1 rows can be slower than the MACs predict, even slower than the static student: "
        "every runtime call has a fixed cost (Python, ONNX Runtime's dispatch and buffers) that "
        "MACs do not count and that is a large share of a small model's time per image, and "
        "each exit an image passes runs its head and exit score, few MACs but many small "
        "operators, slow per MAC. Larger batches share the fixed cost.\n"
    )


def _number_list(kind: type) -> Callable[[str], list]:
    """An argparse `type=` for `--thresholds 0.5,1` and `--batch 1,8`: erde's one comma list."""
    from erde.config.comma_list import comma_list_type

    return comma_list_type(kind)


def add_commands(sub: argparse._SubParsersAction, command: Callable) -> None:
    """Register export, infer and bench on the CLI's sub-parsers `sub`, each through the
    CLI's `command(name, func, help, examples)` helper, which creates it on `sub`."""
    _add_export(command)
    _add_infer(command)
    add_bench_arguments(
        command(
            "bench",
            bench_command,
            "latency of early exit against the static student and teacher, on the run's test "
            "images: realised versus MACs-predicted speed-up",
            [
                "erde bench runs/erde --reference runs/teacher",
                "erde bench exported/erde-int8 --batch 1 --repeats 300 --warmup 30",
                "erde bench runs/erde --int8 --thresholds 0,0.5,1",
            ],
        )
    )


def _add_export(command: Callable) -> None:
    p = command(
        "export",
        export_command,
        "export a run as ONNX pieces that stop at the first sure exit, plus single.onnx (one "
        "call per image) and static.onnx (no early exit)",
        [
            "erde export runs/erde --out exported/erde",
            "erde export runs/erde --out exported/erde-int8 --int8",
            "erde export runs/erde --out exported/erde-0.3 --threshold 0.3 --policy maxprob",
            "erde export runs/erde --out exported/erde-et --format executorch",
        ],
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
        help=f"{POLICY_HELP} (default: the policy of the run's evaluation report, else entropy)",
    )
    add_policy_module(p)
    p.add_argument(
        "--normalize-score",
        "--normalize",
        dest="normalize",
        action="store_true",
        default=None,
        help="exit score divided by the policy's normalizer, entropy: log K, so thresholds lie "
        "in [0, 1] (the score, not the pixels; default: as the run's evaluation report, else "
        "off)",
    )
    p.add_argument("--opset", type=int, help=OPSET_HELP)
    p.add_argument(
        "--format",
        choices=("onnx", "executorch"),
        default="onnx",
        help="onnx: pieces, single.onnx and static.onnx; executorch: early_exit.pte, one "
        "ExecuTorch program whose exits are branches (needs `pip install 'erde[executorch]'`)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="static int8 (QDQ, per-channel) calibrated on val; threshold re-chosen on it",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="re-export into an earlier export that also holds other files, deleting them",
    )


def _add_infer(command: Callable) -> None:
    p = command(
        "infer",
        infer_command,
        "classify image files with an exported early-exit model: class, exit (1-based) and "
        "confidence per file; a file converted beyond recognition (colour to grey, a size far "
        "from the model's) gets a warning on stderr",
        [
            "erde infer exported/erde photo1.png photo2.jpg",
            "erde infer exported/erde images/*.png --format csv > answers.csv",
            "erde infer exported/erde photos/ 'scans/**/*.jpg'",
            "erde infer exported/erde digit.png --format json --threshold 0",
            "erde infer exported/erde photos/ --budget 0.5",
        ],
    )
    p.add_argument("export", metavar="DIR", help="folder written by `erde export`")
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="PNG, JPEG, ... files; a folder: its image files, sorted by name; a quoted glob "
        "pattern (** for subfolders): its matches, sorted",
    )
    p.add_argument(
        "--format",
        choices=INFER_FORMATS,
        default="table",
        help="table: markdown for people; json: one list of objects; csv: a header row and "
        f"one row per file; json and csv fields: {', '.join(INFER_FIELDS)}",
    )
    choice = p.add_mutually_exclusive_group()
    choice.add_argument(
        "--threshold",
        type=float,
        help="exit threshold; 0: every image to the last exit (default: the export's own)",
    )
    choice.add_argument(
        "--budget",
        type=float,
        help="MACs per image (<= 1: a fraction of the full model's): use the threshold of the "
        "export's val curve with the highest val accuracy within it (default: the export's own "
        "threshold)",
    )
    choice.add_argument(
        "--latency-budget",
        type=float,
        metavar="MS",
        help="milliseconds per image at batch 1 on this machine: each exit is timed here, then "
        "the export's val curve point with the highest val accuracy expected within it is used "
        "(default: the export's own threshold)",
    )
    p.add_argument(
        "--threads",
        type=whole_number(1, cores()),
        help="ONNX Runtime intra-op threads, at most the cores (default: all, for throughput; "
        "`erde bench` times 1 by default)",
    )
    _form_argument(p)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `erde bench` (also used by bench/latency.py)."""
    p.add_argument("target", metavar="RUN|DIR", help="run folder or `erde export` folder")
    p.add_argument(
        "--reference",
        metavar="TEACHER_RUN",
        help="also time this run (the teacher), statically (default: no reference row)",
    )
    p.add_argument(
        "--thresholds",
        type=_number_list(float),
        help="comma list (default: 0, the val-calibrated budget points and the calibrated one)",
    )
    p.add_argument(
        "--batch", type=_number_list(int), default=[1, 64], help="batch sizes (default: 1,64)"
    )
    p.add_argument(
        "--repeats",
        type=whole_number(1),
        default=100,
        help="timed batches per batch size (default: 100)",
    )
    p.add_argument(
        "--warmup", type=whole_number(0), default=10, help="untimed batches first (default: 10)"
    )
    p.add_argument(
        "--threads",
        type=whole_number(0, cores()),
        default=1,
        help="ONNX Runtime intra-op threads, at most the cores (0: all; default: 1, unlike "
        "`erde infer`'s all: an edge device's single core, and a timing a busy neighbour "
        "disturbs least)",
    )
    p.add_argument(
        "--int8", action="store_true", help="also export the run as int8 and time it (a run only)"
    )
    add_policy_module(p)
    p.add_argument(
        "--executorch",
        metavar="ET_DIR",
        help="also time this `erde export --format executorch` folder of the same weights, one "
        "image per call, at the same thresholds (default: none)",
    )
    _form_argument(p)


def _form_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--form",
        choices=FORMS,
        default="auto",
        help="single: early exit in one call per image; split: batches split between the exit "
        "pieces; auto: single at batch 1, split above (default: auto)",
    )
