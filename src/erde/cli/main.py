"""Command line: parses arguments, calls one library function per command, prints the result.

User mistakes (`ErdeError`, a bad command line) and a disk that refuses a file (`OSError`: full,
read-only, missing permission) end with one line on stderr and exit status 2; a reader that
stops reading (`erde models | head`) ends the command silently; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from erde.cli.deploy import POLICY_HELP, add_policy_module, import_policy_module
from erde.cli.numbers import whole_number
from erde.config.methods import PAPER_METHODS
from erde.errors import ErdeError, one_line
from erde.logs import log_to_stdout


def _models(args: argparse.Namespace) -> None:
    from erde.models.catalogue import describe, model_names, name_row, namespaces
    from erde.run.report import markdown_table

    names = model_names(args.pattern)
    if not names:
        raise ErdeError(f"no model matches {args.pattern!r}; `erde models` lists them all")
    if len(names) > 1:
        rows = [[r.name, r.source, r.description] for r in map(name_row, names)]
        print(markdown_table(["model", "source", "about"], rows))
        print(
            f"\n{len(names)} models. `erde models NAME` gives one model's default exits, input "
            "size, MACs and parameters; `erde macs NAME` its MACs per exit."
        )
        if args.pattern.strip() == "*":
            print(namespaces())
        return
    r = describe(names[0], args.num_classes)
    exits = ",".join(map(str, r.default_exits)) or "none"
    params = f"params ({r.num_classes} classes, exit heads included)"
    headers = ["model", "source", "default exits", "input", "MACs (plain network)", params, "about"]
    size = f"{r.input_size}x{r.input_size}"
    row = [r.name, r.source, exits, size, f"{r.macs / 1e6:,.1f} M", f"{r.params / 1e6:.2f} M"]
    print(markdown_table(headers, [[*row, r.description]]))


def _macs(args: argparse.Namespace) -> None:
    from erde.models import create_model
    from erde.models.macs import macs_table
    from erde.run.report import markdown_table

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
    size, classes = model.input_size, args.num_classes
    print(f"{args.model}: MACs per image ({size}x{size}x{args.in_channels}, {classes} classes)")
    print(
        markdown_table(
            ["exit", "after block", "MACs (segment + head)", "cumulative MACs", "% of full"], rows
        )
    )


def _config_show(args: argparse.Namespace) -> None:
    from erde.config.help import show_config

    print(show_config(args.config, args.overrides, reproduce=args.reproduce), end="")


def _train(args: argparse.Namespace) -> None:
    from erde.config.schema import load_config

    cfg = (
        None if (args.resume and args.config is None) else load_config(args.config, args.overrides)
    )
    from erde.train.engine import fit  # after the config: a typo is reported without loading torch

    row = fit(
        cfg,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        stop_after=args.stop_after,
    )
    accs = ", ".join(
        f"exit {i}: {100 * row[f'val/acc/{i}']:.2f}"
        for i in range(1, 1 + sum(k.startswith("val/acc/") for k in row))
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the whole run
        print(f"finished {args.out}: epoch {row.get('epoch')}, val accuracy (%) {accs}")


def _evaluate(args: argparse.Namespace) -> None:
    from erde.evaluation.runs import evaluate_run, evaluation_dir

    import_policy_module(args)
    criterion = {"policy": args.policy, "normalize": args.normalize, "max_drop": args.max_drop}
    out = evaluation_dir(
        args.run, args.out, **criterion, budget=args.budget, replace_export=args.replace_export
    )
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
        replace_export=args.replace_export,
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
    from erde.run.layout import ComparisonDir

    import_policy_module(args)
    comparison = compare_runs(
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
    if args.versus:
        from erde.evaluation.versus import against, render_versus
        from erde.files import write_text

        text = render_versus(against(comparison, args.versus), args.versus)
        write_text(files.versus_md, text)
        print(text)


def _reproduce(args: argparse.Namespace) -> None:
    from erde.config.schema import load_reproduce_config
    from erde.study.grid import parse_grid_options
    from erde.study.shard import parse_shard

    shard = parse_shard(args.shard) if args.shard else None
    cfg = load_reproduce_config(args.preset, args.overrides, parse_grid_options(args.grid))
    from erde.study.reproduce import reproduce  # after the config, as in _train

    comparison = reproduce(
        cfg,
        args.out,
        seeds=args.seeds,
        teacher=args.teacher,
        teacher_per_seed=args.teacher_per_seed,
        progress=not args.no_progress,
        jobs=args.jobs,
        shard=shard,
    )
    if comparison is None:
        print(f"shard {shard} done; the comparison waits for the other runs (see the log above)")
        return
    print((Path(args.out) / "comparison.md").read_text(encoding="utf-8"))
    print(f"plot: {Path(args.out) / 'comparison.png'}; every run folder is in {args.out}")


def _tune(args: argparse.Namespace) -> None:
    from erde.config.schema import load_reproduce_config

    cfg = load_reproduce_config(args.preset, args.overrides)
    from erde.study.tune import tune  # after the config, as in _train

    result = tune(
        cfg,
        args.out,
        trials=args.trials,
        storage=args.storage,
        teacher=args.teacher,
        final_seeds=args.final_seeds or (),
        progress=not args.no_progress,
    )
    for b in result.best.values():
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b.params.items()
        )
        print(
            f"{b.method}: best validation AUC {100 * b.val_auc:.2f} % ({params}) after "
            f"{b.finished_trials} trials, run {Path(args.out) / b.method / b.run}"
        )
    if result.comparison is not None:
        final = Path(args.out) / "final"
        print((final / "comparison.md").read_text(encoding="utf-8"))
        print(f"plot: {final / 'comparison.png'}")


def _seeds(text: str) -> list[int]:
    """`--seeds 0,1,2`: distinct seeds, since a repeated seed would train the same run twice."""
    from erde.config.comma_list import comma_list_type
    from erde.config.records import SEED

    seeds = comma_list_type(int)(text)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct seeds such as 0,1,2")
    if not all(SEED.holds(seed) for seed in seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds are whole numbers {SEED.rule()}")
    return seeds


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes in the same one-line form as every other mistake."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


class _Help(argparse.HelpFormatter):
    """Examples keep their lines; an option's default is shown wherever it says something."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        # `is`, not `in (None, False, ...)`: 0 and 0.0 equal False but are defaults worth showing.
        unset = default is None or default is False or default is argparse.SUPPRESS
        if "default" in text or unset or default == []:
            return text
        if isinstance(default, list):
            default = ",".join(map(str, default))
        return f"{text} (default: {default})"


def _presets(kind: str) -> str:
    from erde.config.preset_names import preset_names  # the standard library only

    return ", ".join(preset_names(kind))


def build_parser() -> argparse.ArgumentParser:
    from erde import __version__

    parser = _Parser(
        prog="erde",
        description="Early-exit classifiers trained by Entropy-Regularized Distillation",
        epilog="start with `erde quickstart`; `erde COMMAND --help` has examples for each command",
    )
    parser.add_argument("--version", action="version", version=f"erde {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, func: Callable, help: str, examples: Sequence[str] = ()
    ) -> argparse.ArgumentParser:
        epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None
        p = sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=_Help)
        p.set_defaults(func=func)
        return p

    p = command(
        "models",
        _models,
        "the early-exit models: erde's, plugins', timm's, torchvision's",
        ["erde models", "erde models 'torchvision/*'", "erde models torchvision/resnet50"],
    )
    p.add_argument(
        "pattern",
        nargs="?",
        default="*",
        help="e.g. 'resnet*', 'timm/convnext*', 'torchvision/*'; one model's name (or a pattern "
        "that matches one) shows its exits, MACs and parameters",
    )
    p.add_argument(
        "--num-classes",
        type=whole_number(2),
        default=None,
        help="classes of one model's heads (default: 1000 for timm/torchvision, 10 otherwise)",
    )

    p = command(
        "macs",
        _macs,
        "per-exit MACs of a model",
        ["erde macs resnet56", "erde macs resnet20 --exits every:3 --num-classes 100"],
    )
    p.add_argument("model", help="a name from `erde models`")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the heads")
    p.add_argument("--in-channels", type=int, default=3, help="image channels")
    p.add_argument("--input-size", type=int, default=None, help="default: the model's own")
    p.add_argument(
        "--exits",
        default=None,
        help='"default", "stages", "every:K" or blocks: "3,6" or "[3, 6]" (default: default)',
    )

    p = command(
        "config",
        _config_show,
        "the resolved config of a train or reproduce preset or file: every key with its type, "
        f"default, allowed values and meaning. Train presets: {_presets('train')}; reproduce "
        f"presets: {_presets('reproduce')}",
        [
            "erde config digits-teacher train.epochs=5",
            "erde config quickstart student.train.epochs=5",
            "erde config --reproduce my-study.yaml",
        ],
    )
    p.add_argument(
        "config", nargs="?", help="preset name or YAML file (default: built-in train defaults)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=0.05")
    p.add_argument(
        "--reproduce",
        action="store_true",
        help="CONFIG is a reproduce file (implied by a reproduce preset's name)",
    )

    p = command(
        "train",
        _train,
        "train a teacher or a student (the method picks the loss); one line per epoch",
        [
            "erde train digits-teacher --out runs/teacher",
            "erde train digits-student distill.method=erde distill.teacher=runs/teacher "
            "--out runs/erde",
        ],
    )
    p.add_argument(
        "config",
        nargs="?",
        help=f"preset name ({_presets('train')}) or YAML file (default: built-in train defaults)",
    )
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
        type=whole_number(1),
        metavar="N",
        help="stop after N epochs of this call; continue later with --resume (default: run to "
        "the end)",
    )

    def policy_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--reference",
            metavar="RUN",
            help="run whose final-exit accuracy to keep and MACs to beat (the teacher); "
            "default: the run's own final exit",
        )
        p.add_argument("--policy", default="entropy", help=f"{POLICY_HELP} (default: entropy)")
        add_policy_module(p)
        p.add_argument(
            "--normalize-score",
            "--normalize",
            dest="normalize",
            action="store_true",
            help="exit score divided by the policy's normalizer (entropy: log K), so thresholds "
            "lie in [0, 1]; the score, not the pixels",
        )
        p.add_argument(
            "--max-drop",
            type=float,
            default=0.0,
            metavar="POINTS",
            help="accuracy points below the reference allowed when choosing on val",
        )
        p.add_argument("--device", default="auto", help="where the logits are computed")

    p = command(
        "evaluate",
        _evaluate,
        "accuracy-versus-MACs report of a run (thresholds from val). The default criterion "
        "writes RUN/eval, whose threshold `erde export` uses; other criteria write "
        "RUN/eval-CRITERION unless --out says otherwise",
        [
            "erde evaluate runs/erde --reference runs/teacher",
            "erde evaluate runs/erde --budget 0.5     # writes runs/erde/eval-budget0.5",
        ],
    )
    p.add_argument("run", help="a finished run folder")
    policy_options(p)
    p.add_argument(
        "--budget",
        type=float,
        metavar="MACS",
        help="choose the threshold for this MACs budget: a fraction of the full model "
        "(<= 1) or MACs per image (default: none; the accuracy criterion of --max-drop)",
    )
    p.add_argument(
        "--out",
        help="report folder (default: RUN/eval, or RUN/eval-CRITERION for another criterion)",
    )
    p.add_argument(
        "--refresh",
        action="store_true",
        help="recompute the logits caches: the run's and the --reference run's",
    )
    p.add_argument(
        "--replace-export",
        action="store_true",
        help="write RUN/eval even when it holds the threshold `erde export` deploys for another "
        "criterion (rule, policy or reference), replacing it; without it that is refused",
    )

    p = command(
        "compare",
        _compare,
        "several runs (methods, seeds) on one table and plot",
        ["erde compare runs/teacher runs/kd runs/erde --reference runs/teacher --out runs/cmp"],
    )
    p.add_argument("runs", nargs="+", help="finished run folders")
    policy_options(p)
    p.add_argument("--out", required=True, help="folder for comparison.md/.json/.png")
    p.add_argument(
        "--versus",
        metavar="METHOD",
        help="also say where each group is above, within spread or below this method's group "
        "over the shared MACs range (versus.md), e.g. kd (default: none)",
    )

    def reproduce_options(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="e.g. student.train.epochs=5 data.root=PATH",
        )
        p.add_argument("--out", default=out, help=f"output folder (default: {out})")
        p.add_argument("--seeds", type=_seeds, default=[0], help="student seeds, e.g. 0,1,2")
        p.add_argument(
            "--teacher", metavar="RUN", help="reuse this finished teacher run (default: train one)"
        )
        p.add_argument(
            "--teacher-per-seed",
            action="store_true",
            help="train one teacher per seed instead of one for all",
        )
        p.add_argument(
            "--no-progress", action="store_true", help="no progress bars (epoch lines stay)"
        )
        p.add_argument(
            "--jobs",
            type=int,
            default=1,
            metavar="N",
            help="train N students at once in separate processes that share the cores",
        )
        p.add_argument(
            "--grid",
            action="append",
            default=[],
            metavar="KEY=V1,V2,...",
            help="one run per value (and per combination of several --grid), e.g. "
            "--grid distill.beta=0.1,0.3,1; student.* and distill.* keys (default: no grid)",
        )
        p.add_argument(
            "--shard",
            metavar="I/N",
            help="train only the I-th of N slices of the runs (1-based), for N processes "
            "sharing --out (default: all runs)",
        )

    p = command(
        "reproduce",
        _reproduce,
        f"the paper's protocol: teacher, students ({', '.join(PAPER_METHODS)}), comparison; "
        "every run is evaluated (RUN/eval), ready for `erde export`",
        [
            "erde reproduce --preset cifar10-cpu data.root=/data/cifar10 --out runs/c10 --jobs 2",
            "erde reproduce --preset quickstart --seeds 0,1 student.train.epochs=5",
        ],
    )
    p.add_argument(
        "--preset", required=True, help=f"reproduce preset ({_presets('reproduce')}) or YAML file"
    )
    reproduce_options(p, "runs/reproduce")

    p = command(
        "quickstart",
        _reproduce,
        "the protocol on embedded digits: about half a minute on 2 CPU cores",
        ["erde quickstart", "erde quickstart --seeds 0,1 --out runs/qs"],
    )
    p.set_defaults(preset="quickstart")
    reproduce_options(p, "runs/quickstart")

    p = command(
        "tune",
        _tune,
        "the same number of Optuna trials per method, scored on validation; then the best "
        "settings with several seeds, compared on test",
        ["erde tune --preset quickstart 'methods=[kd,erde]' --trials 5 --out runs/tune"],
    )
    p.add_argument(
        "--preset", required=True, help=f"reproduce preset ({_presets('reproduce')}) or YAML file"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. 'methods=[kd,erde]'")
    p.add_argument("--out", required=True, help="study folder (trials, study.db, best.json)")
    p.add_argument("--trials", type=int, default=20, help="finished trials per method")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage URL shared by workers on several machines "
        "(default: sqlite:///OUT/study.db)",
    )
    p.add_argument(
        "--teacher", metavar="RUN", help="reuse this finished teacher run (default: train one)"
    )
    p.add_argument(
        "--final-seeds",
        type=_seeds,
        metavar="SEEDS",
        help="then train each method's best setting with these seeds (e.g. 0,1,2) and compare "
        "them on test in OUT/final (default: none)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines stay)")

    from erde.cli.deploy import add_commands

    add_commands(sub, command)
    return parser


def _one_line(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return (
            f"{exc.strerror or exc}: {exc.filename}; check that the path exists, that its "
            "folder is writable and that the disk has free space"
        )
    if isinstance(exc, OSError):  # the system named no path: say what erde can
        return (
            f"{exc.strerror or exc}; check that the folders the command writes are writable "
            "and that the disk has free space"
        )
    return one_line(exc)


def command() -> NoReturn:
    """The `erde` command (`python -m erde` too): `main`, then the exit.

    A `torchrun` worker, its work done and its process group closed, leaves without interpreter
    teardown: under load Gloo's threads can still abort a worker there ("terminate called without
    an active exception", exit -6), and torchrun then reports a finished job as failed.
    """
    code = main()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


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
        sys.stdout.flush()  # here, so that a reader gone is seen here
    except BrokenPipeError:
        # The reader left (`erde models | head`): end quietly, as Python's documentation of
        # SIGPIPE advises, with stdout on devnull so the final flush raises nothing, and the
        # status of a command ended by SIGPIPE (128 + 13).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (ErdeError, OSError) as exc:
        print(f"erde {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"erde {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    command()
