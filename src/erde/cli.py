"""Command line: parses arguments, calls one library function per command, prints the result.

User mistakes (`ErdeError`, a bad command line) and a disk that refuses a file (`OSError`: full,
read-only, missing permission) end with one line on stderr and exit status 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from erde.errors import ErdeError
from erde.logs import log_to_stdout
from erde.methods import STUDENT_METHODS


def _models(args: argparse.Namespace) -> None:
    from erde.models import list_models

    print("\n".join(list_models()))


def _macs(args: argparse.Namespace) -> None:
    from erde.macs import macs_table
    from erde.models import create_model
    from erde.report import markdown_table

    model = create_model(
        args.model,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        exits=args.exits,
        input_size=args.input_size,
    )
    rows = [
        [
            r["exit"],
            r["block"],
            f"{r['segment_macs'] + r['head_macs']:,}",
            f"{r['cumulative_macs']:,}",
            f"{r['percent_of_full']:.1f}",
        ]
        for r in macs_table(model)
    ]
    print(
        f"{args.model}: MACs per image ({args.input_size}x{args.input_size}x{args.in_channels}, "
        f"{args.num_classes} classes)"
    )
    print(
        markdown_table(
            ["exit", "after block", "MACs (segment + head)", "cumulative MACs", "% of full"], rows
        )
    )


def _config_show(args: argparse.Namespace) -> None:
    from erde.config import load_config, to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")


def _train(args: argparse.Namespace) -> None:
    from erde.config import load_config

    cfg = (
        None if (args.resume and args.config is None) else load_config(args.config, args.overrides)
    )
    from erde.train import fit  # after the config: a typo is reported without loading torch

    row = fit(
        cfg,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        stop_after=args.stop_after,
    )
    accs = ", ".join(
        f"exit {i + 1}: {100 * row[f'val/acc/{i}']:.2f}"
        for i in range(sum(k.startswith("val/acc/") for k in row))
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the whole run
        print(f"finished {args.out}: epoch {row.get('epoch')}, val accuracy (%) {accs}")


def _evaluate(args: argparse.Namespace) -> None:
    from erde.evaluation.runs import evaluate_run
    from erde.rundir import ReportDir, RunDir

    out = ReportDir(args.out) if args.out else RunDir(args.run).eval
    r = evaluate_run(
        args.run,
        out=out.path,
        reference=args.reference,
        policy=args.policy,
        normalize=args.normalize,
        max_drop=args.max_drop,
        budget=args.budget,
        refresh=args.refresh,
        device=args.device,
    )
    c = r.chosen
    print(
        f"{r.model} ({r.method}): test accuracy per exit (%) "
        + ", ".join(f"{100 * a:.2f}" for a in r.per_exit_accuracy["test"])
    )
    print(
        f"threshold {c.threshold:.4g} chosen on val ({c.criterion}): "
        f"val accuracy {100 * c.val_accuracy:.2f} %, test accuracy "
        f"{100 * c.test_accuracy:.2f} % at {c.test_expected_macs / 1e6:.3f} M MACs "
        f"per test image ({c.reduction_vs_reference:.2f}x fewer than {r.reference.label})"
    )
    print(f"report: {out.report_md}")


def _compare(args: argparse.Namespace) -> None:
    from erde.evaluation.runs import compare_runs
    from erde.rundir import ComparisonDir

    compare_runs(
        args.runs,
        out=args.out,
        reference=args.reference,
        policy=args.policy,
        normalize=args.normalize,
        max_drop=args.max_drop,
        device=args.device,
    )
    files = ComparisonDir(args.out)
    print(files.comparison_md.read_text(encoding="utf-8"))
    print(f"plot: {files.comparison_png}")


def _reproduce(args: argparse.Namespace) -> None:
    from erde.config import load_reproduce_config

    cfg = load_reproduce_config(args.preset, args.overrides)
    from erde.reproduce import reproduce  # after the config, as in _train

    reproduce(
        cfg,
        args.out,
        seeds=args.seeds,
        teacher=args.teacher,
        teacher_per_seed=args.teacher_per_seed,
        progress=not args.no_progress,
        jobs=args.jobs,
    )
    print((Path(args.out) / "comparison.md").read_text(encoding="utf-8"))
    print(f"plot: {Path(args.out) / 'comparison.png'}; every run folder is in {args.out}")


def _seeds(text: str) -> list[int]:
    """`--seeds 0,1,2`: distinct seeds, since a repeated seed would train the same run twice."""
    from erde.comma_list import comma_list_type

    seeds = comma_list_type(int)(text)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct seeds such as 0,1,2")
    return seeds


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes in the same one-line form as every other mistake."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="erde",
        description="Early-exit classifiers trained by Entropy-Regularized Distillation",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    command("models", _models, "list the registered early-exit models")

    p = command("macs", _macs, "per-exit MACs of a model")
    p.add_argument("model")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--exits", default=None, help='"default", "stages", "every:K" or e.g. "3,6"')

    p = command("config", _config_show, "print the resolved config of a preset or file")
    p.add_argument(
        "config", nargs="?", help="preset name or YAML file (default: built-in defaults)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = command("train", _train, "train a teacher or a student (the method picks the loss)")
    p.add_argument("config", nargs="?", help="preset name or YAML file")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="e.g. distill.method=erde distill.teacher=runs/teacher train.epochs=5",
    )
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="stop after N epochs of this call; continue later with --resume",
    )

    def policy_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--reference",
            metavar="RUN",
            help="run whose final-exit accuracy to keep and MACs to beat (the teacher); "
            "default: the run's own final exit",
        )
        p.add_argument("--policy", choices=("entropy", "maxprob"), default="entropy")
        p.add_argument("--normalize", action="store_true", help="entropy divided by log K")
        p.add_argument(
            "--max-drop",
            type=float,
            default=0.0,
            metavar="POINTS",
            help="accuracy points below the reference allowed when choosing on val",
        )
        p.add_argument("--device", default="auto")

    p = command("evaluate", _evaluate, "accuracy-versus-MACs report of a run (thresholds from val)")
    p.add_argument("run")
    policy_options(p)
    p.add_argument(
        "--budget",
        type=float,
        metavar="MACS",
        help="choose the threshold for this MACs budget: a fraction of the full model "
        "(<= 1) or MACs per image",
    )
    p.add_argument("--out", help="report folder (default: RUN/eval)")
    p.add_argument("--refresh", action="store_true", help="recompute the logits cache")

    p = command("compare", _compare, "several runs (methods, seeds) on one table and plot")
    p.add_argument("runs", nargs="+")
    policy_options(p)
    p.add_argument("--out", required=True, help="folder for comparison.md/.json/.png")

    def reproduce_options(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="e.g. student.train.epochs=5 data.root=PATH",
        )
        p.add_argument("--out", default=out, help=f"output folder (default: {out})")
        p.add_argument("--seeds", type=_seeds, default=[0], help="student seeds, e.g. 0,1,2")
        p.add_argument("--teacher", metavar="RUN", help="reuse this finished teacher run")
        p.add_argument(
            "--teacher-per-seed",
            action="store_true",
            help="train one teacher per seed instead of one for all",
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument(
            "--jobs",
            type=int,
            default=1,
            metavar="N",
            help="train N students at once in separate processes that share the cores (default 1)",
        )

    p = command(
        "reproduce",
        _reproduce,
        f"the paper's protocol: teacher, students ({', '.join(STUDENT_METHODS)}), comparison",
    )
    p.add_argument("--preset", required=True, help="reproduce preset name or YAML file")
    reproduce_options(p, "runs/reproduce")

    p = command(
        "quickstart",
        _reproduce,
        "the protocol on embedded digits: about half a minute on 2 CPU cores",
    )
    p.set_defaults(preset="quickstart")
    reproduce_options(p, "runs/quickstart")

    from erde.deploy.commands import add_commands

    add_commands(sub, command)
    return parser


def _one_line(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return (
            f"{exc.strerror or exc}: {exc.filename}; check that the path exists, that its "
            "folder is writable and that the disk has free space"
        )
    return " ".join(str(exc).split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (`--out runs/x train.epochs=5`).
    if (
        extra
        and hasattr(args, "overrides")
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("config", "train") and args.config and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    log_to_stdout()
    try:
        args.func(args)
    except (ErdeError, OSError) as exc:
        print(f"erde {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"erde {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
