"""Does early exit save wall time, and as much as the MACs promise? Measured on the run's test set.

Things run on the same ONNX Runtime CPU settings and the same test images: (a) the full static
student (`static.onnx`: the plain network, no intermediate heads), (b) the early-exit runtime at
several thresholds (batch 1 in one call through `single.onnx`, larger batches split between
pieces: the runtime's "auto" rule, unless `form` says otherwise), optionally (c) the same two for
the int8 export (`erde export --int8`, threshold re-chosen on its val outputs) and (d) the
teacher, exported the same way as (a). Per-exit test accuracy of fp32 and int8 is measured on the
whole test split with the exported pieces.

Method: the test images are cut into `warmup + repeats` consecutive batches per batch size. Every
batch is run by every configuration in turn (the order rotates from batch to batch), so all of
them meet the same background load at nearly the same moment; the first `warmup` batches are not
timed. Latency is per batch call (median and 90th percentile); throughput is the batch size over
the median latency, so the two columns state one statistic. The realised speed-up of a
configuration is the static student's summed time over its own on the same images (summed, as the
MACs it is set beside are a mean over the images); the MACs-predicted one is the static student's
MACs over the configuration's mean MACs per image on those images (for early exit: the cumulative
MACs of the exit each image took). A row's test accuracy is over its timed images (batch x
repeats, a column of its own); the per-exit table under it covers the whole test split.

Rows are named by the run's method: a network trained as `teacher` is a teacher, any other a
student; the `--reference` run's row says it is the reference.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from erde.config.schema import load_config
from erde.data.pixels import normalize_images
from erde.deploy.export import export_run, static_network
from erde.deploy.manifest import MANIFEST, Manifest, read_manifest
from erde.deploy.onnx_export import export_graph
from erde.deploy.runtime import EarlyExitRuntime, export_session, ort_session
from erde.deploy.threshold import has_calibration
from erde.deploy.torch_backend import exit_logits
from erde.device import check_batch_memory
from erde.errors import ErdeError
from erde.evaluation.metrics import per_exit_accuracy
from erde.models.load import load_model
from erde.run import checkpoint as ckpt
from erde.run.layout import RunDir
from erde.run.report import budget_label, markdown_table


@dataclass
class BenchRow:
    model: str
    threshold: float | None  # None for the static graphs
    batch: int
    median_ms: float  # per batch call
    p90_ms: float
    images_per_s: float  # batch / median latency
    accuracy: float  # on the timed test images (batch x repeats)
    expected_macs: float  # mean MACs per timed image
    predicted_speedup: float  # static student MACs / expected_macs
    realised_speedup: float  # static student time / this time, same images
    exit_share: list[float] | None = None  # early exit only
    tag: str = ""  # says when the threshold is the export's own

    @property
    def realised_fraction(self) -> float:
        """Realised speed-up as a fraction of the MACs-predicted one."""
        return self.realised_speedup / self.predicted_speedup


@dataclass(frozen=True)
class Benchmark:
    """What `benchmark` measured: the timed rows, each export's per-exit test accuracy, and the
    export and settings they were measured with (what `render_benchmark` states beside them)."""

    rows: list[BenchRow]
    per_exit_accuracy: dict[str, list[float]]  # precision (fp32, int8) -> accuracy per exit
    export: Manifest  # the first export timed: its model, exit rule and MACs
    reference: str | None  # the teacher run timed beside the student, if any
    threads: int | None  # ONNX Runtime intra-op threads; None: its default
    repeats: int  # timed batches per batch size
    warmup: int  # untimed batches before them
    form: str  # the early-exit form asked for (auto, single, split)
    held_out_images: int  # the test images the batches are drawn from


@dataclass
class _Timed:
    """One configuration under measurement: `run(batch) -> (classes, exits (1-based) or None)`."""

    name: str
    threshold: float | None
    run: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray | None]]
    static_macs: int | None  # None: early exit, MACs follow the exits taken
    tag: str = ""


def static_runner(session) -> Callable[[torch.Tensor], tuple[np.ndarray, None]]:
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> tuple[np.ndarray, None]:
        return session.run(None, {name: x.numpy()})[0].argmax(axis=1), None

    return run


def early_exit_runner(
    runtime: EarlyExitRuntime, threshold: float, form: str
) -> Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]:
    runtime = runtime.with_threshold(threshold)

    def run(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        pred = runtime.predict(x, form=form)
        return pred.labels, pred.exits

    return run


def held_out_images(run_dir: Path, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's test split, normalised as in training, and its labels."""
    from erde.data.prepare import prepare_data

    config = RunDir(run_dir).config
    if not config.is_file():
        raise ErdeError(
            f"the run this export came from ({run_dir}) is not available ({config} is "
            "missing), so there are no test images to time; give the run folder instead"
        )
    x, y = prepare_data(load_config(str(config), recorded=True)).test  # streamed data: a message
    d = manifest.info.data
    return normalize_images(x, d.mean, d.std), y


def _teacher(reference: Path, manifest: Manifest, tmp: Path, threads: int | None) -> _Timed:
    """The reference run's plain network, exported and run like the static student."""
    model, info = load_model(reference)
    key = info.data.mismatch(manifest.info.data)
    if key is not None:
        raise ErdeError(
            f"reference {reference} was trained on data with {key}={getattr(info.data, key)!r} "
            f"but the student on {key}={getattr(manifest.info.data, key)!r}; give the teacher "
            "of this student"
        )
    size, channels = manifest.info.data.input_size, manifest.info.data.in_channels
    with torch.no_grad():
        proto = export_graph(
            static_network(model),
            torch.zeros(2, channels, size, size),
            "image",
            ["logits"],
            manifest.opset,
        )
    return _Timed(
        f"reference {_role(info.method)} {info.name}, static",
        None,
        static_runner(ort_session(proto.SerializeToString(), threads)),
        info.static_macs,
    )


def _student(
    export_dir: Path, thresholds: list[float] | None, threads: int | None, form: str
) -> tuple[list[_Timed], Manifest, EarlyExitRuntime]:
    """The static graph and the early-exit runtime of one export, at its own threshold, 0 (no
    early exit: what the heads and the decisions cost) and its val-calibrated budget points
    unless `thresholds` are given."""
    manifest = read_manifest(export_dir)
    own = manifest.deployment.threshold
    budgets = manifest.budget_thresholds
    chosen = sorted({own, *(thresholds or [0.0, *budgets.values()])})
    runtime = EarlyExitRuntime.from_export(export_dir, threads=threads)
    static = export_session(export_dir, manifest.static, threads)
    name = manifest.info.name + ("" if manifest.precision == "fp32" else f" {manifest.precision}")
    role = _role(manifest.info.method)
    configs = [
        _Timed(f"{role} {name}, static", None, static_runner(static), manifest.info.static_macs)
    ]
    source = manifest.deployment.threshold_source
    tags = {t: f" ({budget_label(float(fraction))})" for fraction, t in budgets.items()}
    tags[own] = " (given)" if source == "given" else f" ({source.split(' on ')[0]})"
    configs += [
        _Timed(
            f"{role} {name}, early exit",
            t,
            early_exit_runner(runtime, t, form),
            None,
            tags.get(t, ""),
        )
        for t in chosen
    ]
    return configs, manifest, runtime


def _role(method: str) -> str:
    """What a run's row calls it: its method says whether it was trained as the teacher."""
    return "teacher" if method == "teacher" else "student"


def _measure(
    configs: list[_Timed],
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    warmup: int,
    repeats: int,
    exit_macs: list[int],
    static_macs: int,
) -> list[BenchRow]:
    """Every batch through every configuration in rotating order; rows in `configs` order."""
    n_exits = len(exit_macs)
    cost = np.asarray(exit_macs, dtype=np.float64)
    seconds = [[] for _ in configs]
    correct = [0] * len(configs)
    macs = [0.0] * len(configs)
    exits = [np.zeros(n_exits) for _ in configs]
    for j in range(warmup + repeats):
        idx = torch.arange(j * batch, (j + 1) * batch) % len(y)  # in order, cycling if short
        xb, yb = x[idx], y[idx].numpy()
        for k in np.roll(np.arange(len(configs)), -j):
            start = time.perf_counter()
            classes, taken = configs[k].run(xb)
            elapsed = time.perf_counter() - start
            if j < warmup:
                continue
            seconds[k].append(elapsed)
            correct[k] += int((classes == yb).sum())
            if taken is None:
                macs[k] += configs[k].static_macs * len(yb)
            else:
                index = taken - 1  # exits are 1-based
                macs[k] += float(cost[index].sum())
                exits[k] += np.bincount(index, minlength=n_exits)
    n_images = batch * repeats
    base = sum(seconds[0])
    rows = []
    for k, c in enumerate(configs):
        expected = macs[k] / n_images
        rows.append(
            BenchRow(
                model=c.name,
                threshold=c.threshold,
                batch=batch,
                median_ms=1000 * float(np.median(seconds[k])),
                p90_ms=1000 * float(np.percentile(seconds[k], 90)),
                images_per_s=batch / float(np.median(seconds[k])),
                accuracy=correct[k] / n_images,
                expected_macs=expected,
                predicted_speedup=static_macs / expected,
                realised_speedup=base / sum(seconds[k]),
                exit_share=None if c.static_macs is not None else (exits[k] / n_images).tolist(),
                tag=c.tag,
            )
        )
    return rows


def _check_options(
    target: Path,
    is_export_dir: bool,
    thresholds: list[float] | None,
    batch_sizes: tuple[int, ...] | list[int],
    repeats: int,
    warmup: int,
    int8: bool,
) -> None:
    """Every mistake in the options, before anything is exported or timed."""
    if repeats < 1 or warmup < 0:
        raise ErdeError(f"repeats must be >= 1 and warm-up >= 0; got {repeats} and {warmup}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ErdeError(f"batch sizes must be positive integers; got {list(batch_sizes)}")
    if thresholds is not None and (not thresholds or min(thresholds) < 0):
        raise ErdeError(f"thresholds must be one or more non-negative numbers; got {thresholds}")
    if int8 and is_export_dir:
        raise ErdeError(
            f"--int8 quantizes a run, and {target} is an export; give the run folder, or bench "
            "an `erde export --int8` folder without --int8"
        )
    info = read_manifest(target).info if is_export_dir else ckpt.read_info(target)
    check_batch_memory(max(batch_sizes), info.data.in_channels, info.data.input_size, "--batch")


def benchmark(
    target: str | Path,
    *,
    reference: str | Path | None = None,
    thresholds: list[float] | None = None,
    batch_sizes: tuple[int, ...] | list[int] = (1, 64),
    repeats: int = 100,
    warmup: int = 10,
    threads: int | None = 1,
    int8: bool = False,
    form: str = "auto",
    executorch: str | Path | None = None,
) -> Benchmark:
    """Latency rows of (a) the static student, (b) early exit per threshold, (c) both again in
    int8 when asked, (d) the teacher; per-exit test accuracy of each export.

    `target` is a run folder (exported to a temporary folder first) or an `erde export` folder.
    The export's own threshold (the calibrated one, by default) is always among the thresholds.
    `executorch`: an `erde export --format executorch` folder of the same weights, timed at the
    same thresholds (erde.deploy.executorch_bench).
    """
    target = Path(target)
    is_export_dir = (target / MANIFEST).is_file()
    _check_options(target, is_export_dir, thresholds, batch_sizes, repeats, warmup, int8)
    with tempfile.TemporaryDirectory(prefix="erde-bench-") as tmp_name:
        tmp = Path(tmp_name)
        exports = _exports(target, is_export_dir, tmp, thresholds, int8)
        configs, manifests, accuracy = [], [], {}
        for export_dir in exports:
            timed, manifest, runtime = _student(export_dir, thresholds, threads, form)
            configs += timed
            manifests.append(manifest)
            if len(manifests) == 1:
                x, y = held_out_images(Path(manifest.source_run), manifest)
            logits = exit_logits(runtime.pieces, x)
            accuracy[manifest.precision] = per_exit_accuracy(logits, y).tolist()
        first = manifests[0]
        if executorch is not None:
            from erde.deploy.executorch_bench import executorch_runners

            chosen = [c.threshold for c in configs if c.static_macs is None]
            for name, t, run in executorch_runners(Path(executorch), first, chosen, threads):
                configs.append(_Timed(name, t, run, None))
        if reference is not None:
            configs.append(_teacher(Path(reference), first, tmp, threads))
        info = first.info
        rows = [
            row
            for batch in batch_sizes
            for row in _measure(
                configs, x, y, batch, warmup, repeats, info.exit_macs, info.static_macs
            )
        ]
    return Benchmark(
        rows=rows,
        per_exit_accuracy=accuracy,
        export=first,
        reference=None if reference is None else str(reference),
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        form=form,
        held_out_images=len(y),
    )


def _exports(
    target: Path, is_export_dir: bool, tmp: Path, thresholds: list[float] | None, int8: bool
) -> list[Path]:
    """The export folders to time: `target` itself, or fresh exports of the run (fp32, int8)."""
    if is_export_dir:
        return [target]
    exports = [tmp / "fp32"]
    given = None if thresholds is None or has_calibration(target) else thresholds[0]
    export_run(target, exports[0], threshold=given)
    if int8:
        exports.append(tmp / "int8")
        export_run(target, exports[1], threshold=given, int8=True)
    return exports


_BENCH_COLUMNS = [
    "model",
    "threshold",
    "batch",
    "median ms/batch",
    "p90 ms/batch",
    "images/s (batch / median)",
    "timed images",
    "test accuracy (%) on them",
    "MACs/image (M)",
    "% of static MACs",
    "exit shares",
    "speed-up, MACs-predicted",
    "speed-up, realised (summed time)",
    "realised / predicted (%)",
]


def _bench_cells(r: BenchRow, static_macs: int, repeats: int) -> list:
    """One benchmark row's table cells, in the order of _BENCH_COLUMNS."""
    thr = "-" if r.threshold is None else f"{r.threshold:.4g}{r.tag}"
    return [
        r.model,
        thr,
        r.batch,
        f"{r.median_ms:.3f}",
        f"{r.p90_ms:.3f}",
        f"{r.images_per_s:,.0f}",
        f"{r.batch * repeats:,}",
        f"{100 * r.accuracy:.2f}",
        f"{r.expected_macs / 1e6:.3f}",
        f"{100 * r.expected_macs / static_macs:.0f}",
        "-" if r.exit_share is None else " / ".join(f"{s:.2f}" for s in r.exit_share),
        f"{r.predicted_speedup:.2f}x",
        f"{r.realised_speedup:.2f}x",
        f"{100 * r.realised_fraction:.0f}",
    ]


def render_benchmark(result: Benchmark) -> str:
    """The benchmark as a markdown table (milliseconds per batch call, images/s, MACs in M)."""
    info, deployed = result.export.info, result.export.deployment
    rows = [_bench_cells(r, info.static_macs, result.repeats) for r in result.rows]
    head = (
        f"{info.name} on {info.data.source} test images, policy {deployed.policy}"
        f"{' (normalised)' if deployed.normalize else ''}; ONNX Runtime CPU, "
        f"{result.threads or 'default'} intra-op thread(s); early exit in form "
        f"{result.form!r}; {result.repeats} timed batches per batch size after "
        f"{result.warmup} warm-up batches, drawn in order from the "
        f"{result.held_out_images:,} test images"
    )
    exits = len(info.exit_macs)
    accuracy = markdown_table(
        ["export", *(f"exit {i + 1}" for i in range(exits))],
        [
            [precision, *(f"{100 * a:.2f}" for a in values)]
            for precision, values in result.per_exit_accuracy.items()
        ],
    )
    return (
        head
        + "\n\n"
        + markdown_table(_BENCH_COLUMNS, rows)
        + f"\nTest accuracy (%) per exit, all {result.held_out_images:,} test images, exported "
        "pieces:\n\n" + accuracy
    )
