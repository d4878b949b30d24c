"""Does early exit save wall time, and as much as the MACs promise? Measured on the run's test set.

Three things run on the same ONNX Runtime CPU settings and the same test images: (a) the full
static student (`static.onnx`: the plain network, no intermediate heads), (b) the early-exit
runtime at several thresholds and (c) optionally the teacher, exported the same way as (a).

Method: the test images are cut into `warmup + repeats` consecutive batches per batch size. Every
batch is run by every configuration in turn (the order rotates from batch to batch), so all of
them meet the same background load at nearly the same moment; the first `warmup` batches are not
timed. Latency is per batch call (median and 90th percentile); throughput is timed images over
the summed time. The realised speed-up of a configuration is the static student's summed time
over its own on the same images; the MACs-predicted one is the static student's MACs over the
configuration's mean MACs per image on those images (for early exit: the cumulative MACs of the
exit each image took).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from erde import checkpoint as ckpt
from erde.config import load_config
from erde.deploy.export import export_onnx, export_run, static_network
from erde.deploy.images import normalize_images
from erde.deploy.manifest import MANIFEST, Manifest, read_manifest, read_verified
from erde.deploy.runtime import EarlyExitRuntime, ort_session
from erde.deploy.threshold import budget_thresholds, has_calibration
from erde.errors import ErdeError
from erde.report import markdown_table
from erde.rundir import RunDir


@dataclass
class BenchRow:
    model: str
    threshold: float | None  # None for the static graphs
    batch: int
    median_ms: float  # per batch call
    p90_ms: float
    images_per_s: float
    accuracy: float  # on the timed test images
    expected_macs: float  # mean MACs per timed image
    predicted_speedup: float  # static student MACs / expected_macs
    realised_speedup: float  # static student time / this time, same images
    exit_share: list[float] | None = None  # early exit only

    @property
    def realised_fraction(self) -> float:
        """Realised speed-up as a fraction of the MACs-predicted one."""
        return self.realised_speedup / self.predicted_speedup


@dataclass
class _Timed:
    """One configuration under measurement: `run(batch) -> (classes, exit indices or None)`."""

    name: str
    threshold: float | None
    run: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray | None]]
    static_macs: int | None  # None: early exit, MACs follow the exits taken


def _static_runner(session) -> Callable[[torch.Tensor], tuple[np.ndarray, None]]:
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> tuple[np.ndarray, None]:
        return session.run(None, {name: x.numpy()})[0].argmax(axis=1), None

    return run


def _early_exit_runner(
    runtime: EarlyExitRuntime, threshold: float
) -> Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]:
    runtime = runtime.with_threshold(threshold)

    def run(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        pred = runtime.predict(x)
        return pred.classes, pred.exit_index

    return run


def _test_images(run_dir: Path, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's test split, normalised as in training, and its labels."""
    from erde.data.prepare import prepare_data

    config = RunDir(run_dir).config
    if not config.is_file():
        raise ErdeError(
            f"the run this export came from ({run_dir}) is not available ({config} is "
            "missing), so there are no test images to time; give the run folder instead"
        )
    data = prepare_data(load_config(str(config))).data
    d = manifest.info.data
    return normalize_images(data.test_x, d.mean, d.std), data.test_y


def _teacher(reference: Path, manifest: Manifest, tmp: Path, threads: int | None) -> _Timed:
    """The reference run's plain network, exported and run like the static student."""
    model, info = ckpt.load_model(reference)
    key = info.data.mismatch(manifest.info.data)
    if key is not None:
        raise ErdeError(
            f"reference {reference} was trained on data with {key}={getattr(info.data, key)!r} "
            f"but the student on {key}={getattr(manifest.info.data, key)!r}; give the teacher "
            "of this student"
        )
    size, channels = manifest.info.data.input_size, manifest.info.data.in_channels
    with torch.no_grad():
        export_onnx(
            static_network(model),
            tmp / "teacher.onnx",
            torch.zeros(2, channels, size, size),
            "image",
            ["logits"],
            manifest.opset,
        )
    return _Timed(
        f"teacher {info.name}, static",
        None,
        _static_runner(ort_session(str(tmp / "teacher.onnx"), threads)),
        info.static_macs,
    )


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
                macs[k] += float(cost[taken].sum())
                exits[k] += np.bincount(taken, minlength=n_exits)
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
                images_per_s=n_images / sum(seconds[k]),
                accuracy=correct[k] / n_images,
                expected_macs=expected,
                predicted_speedup=static_macs / expected,
                realised_speedup=base / sum(seconds[k]),
                exit_share=None if c.static_macs is not None else (exits[k] / n_images).tolist(),
            )
        )
    return rows


def benchmark(
    target: str | Path,
    *,
    reference: str | Path | None = None,
    thresholds: list[float] | None = None,
    batch_sizes: tuple[int, ...] | list[int] = (1, 64),
    repeats: int = 100,
    warmup: int = 10,
    threads: int | None = 1,
) -> dict:
    """Latency rows of (a) the static student, (b) early exit per threshold, (c) the teacher.

    `target` is a run folder (exported to a temporary folder first) or an `erde export` folder.
    The export's own threshold (the calibrated one, by default) is always among the thresholds.
    Returns {"rows": [BenchRow, ...], and what was measured and how}.
    """
    if repeats < 1 or warmup < 0:
        raise ErdeError(f"repeats must be >= 1 and warm-up >= 0; got {repeats} and {warmup}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ErdeError(f"batch sizes must be positive integers; got {list(batch_sizes)}")
    if thresholds is not None and (not thresholds or min(thresholds) < 0):
        raise ErdeError(f"thresholds must be one or more non-negative numbers; got {thresholds}")
    target = Path(target)
    with tempfile.TemporaryDirectory(prefix="erde-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if (target / MANIFEST).is_file():
            export_dir = target
        else:
            export_dir = tmp / "export"
            given = None if thresholds is None or has_calibration(target) else thresholds[0]
            export_run(target, export_dir, threshold=given)
        manifest = read_manifest(export_dir)
        run_dir = Path(manifest.source_run)
        own = manifest.deployment.threshold
        # 0: no early exit, what the heads and the splitting cost.
        chosen = sorted({own, *(thresholds or [0.0, *budget_thresholds(run_dir)])})
        runtime = EarlyExitRuntime.from_export(export_dir, threads=threads)
        static_macs = manifest.info.static_macs
        static = ort_session(read_verified(export_dir, manifest.static), threads)
        name = manifest.info.name
        configs = [_Timed(f"student {name}, static", None, _static_runner(static), static_macs)]
        configs += [
            _Timed(
                f"student {name}, early exit",
                t,
                _early_exit_runner(runtime, t),
                None,
            )
            for t in chosen
        ]
        if reference is not None:
            configs.append(_teacher(Path(reference), manifest, tmp, threads))
        x, y = _test_images(run_dir, manifest)
        rows = [
            row
            for batch in batch_sizes
            for row in _measure(
                configs, x, y, batch, warmup, repeats, manifest.info.exit_macs, static_macs
            )
        ]
    return {
        "rows": rows,
        "run": str(run_dir),
        "reference": None if reference is None else str(reference),
        "model": name,
        "policy": manifest.deployment.policy,
        "normalize": manifest.deployment.normalize,
        "export_threshold": own,
        "threshold_source": manifest.deployment.threshold_source,
        "exit_macs": manifest.info.exit_macs,
        "static_macs": static_macs,
        "threads": threads,
        "repeats": repeats,
        "warmup": warmup,
        "data_source": manifest.info.data.source,
        "test_images": len(y),
    }


def render_benchmark(result: dict) -> str:
    """The benchmark as a markdown table (milliseconds per batch call, images/s, MACs in M)."""
    own = result["export_threshold"]
    tag = " (calibrated)" if result["threshold_source"].startswith("calibrated") else " (export)"
    rows = []
    for r in result["rows"]:
        if r.threshold is None:
            thr = "-"
        else:
            thr = f"{r.threshold:.4g}" + (tag if r.threshold == own else "")
        rows.append(
            [
                r.model,
                thr,
                r.batch,
                f"{r.median_ms:.3f}",
                f"{r.p90_ms:.3f}",
                f"{r.images_per_s:,.0f}",
                f"{100 * r.accuracy:.2f}",
                f"{r.expected_macs / 1e6:.3f}",
                f"{100 * r.expected_macs / result['static_macs']:.0f}",
                "-" if r.exit_share is None else " / ".join(f"{s:.2f}" for s in r.exit_share),
                f"{r.predicted_speedup:.2f}x",
                f"{r.realised_speedup:.2f}x",
                f"{100 * r.realised_fraction:.0f}",
            ]
        )
    head = (
        f"{result['model']} on {result['data_source']} test images, policy {result['policy']}"
        f"{' (normalised)' if result['normalize'] else ''}; ONNX Runtime CPU, "
        f"{result['threads'] or 'default'} intra-op thread(s); {result['repeats']} timed batches "
        f"per batch size after {result['warmup']} warm-up batches, drawn in order from the "
        f"{result['test_images']:,} test images"
    )
    return (
        head
        + "\n\n"
        + markdown_table(
            [
                "model",
                "threshold",
                "batch",
                "median ms/batch",
                "p90 ms/batch",
                "images/s",
                "test accuracy (%)",
                "MACs/image (M)",
                "% of static MACs",
                "exit shares",
                "speed-up, MACs-predicted",
                "speed-up, realised",
                "realised / predicted (%)",
            ],
            rows,
        )
    )
