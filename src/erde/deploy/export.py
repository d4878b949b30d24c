"""A trained run as ONNX graphs a runtime can stop between, plus the manifest that ties them.

Piece i holds segment i and head i fused, with three outputs: the features the next segment needs,
the logits of exit i and its exit score (the last piece has only logits). Running piece 1,
deciding per image and feeding only the undecided images to piece 2 is then real early exit: the
skipped images never touch the rest of the network. `single.onnx` chains the same pieces with an
`If` per exit for one call per image (erde.deploy.single). `static.onnx` is the plain network
(every segment and the final head, no intermediate heads), the honest no-early-exit baseline for
benchmarks and for users who want it. With `int8=True` every graph is quantized and the threshold
re-chosen on the quantized model (erde.deploy.int8).

Exporter: `torch.onnx.export(dynamo=True)` at opset 18 by default (erde.deploy.onnx_export).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from erde.deploy.deploy_md import deploy_md
from erde.deploy.manifest import (
    DEPLOY_MD,
    MANIFEST,
    Deployment,
    Manifest,
    export_files,
    is_export,
)
from erde.deploy.onnx_export import OPSET, check_exporter, check_opset, export_graph, save_graph
from erde.deploy.plugin_policy import check_scores, traced
from erde.deploy.single import single_graph
from erde.deploy.threshold import budget_thresholds, deployment, val_curve
from erde.errors import ErdeError
from erde.evaluation.policy import exit_scores
from erde.files import WriteFailed, write_fix, write_json, write_text
from erde.models.load import load_run_model
from erde.run.checkpoint import check_finished
from erde.run.layout import RunDir
from erde.run.model_info import ModelInfo

STATIC, SINGLE = "static.onnx", "single.onnx"


class ExitPiece(nn.Module):
    """Segment then head: (features, logits, exit score), or logits alone when nothing follows.

    The score is computed in the graph with the simulator's own formula, so the runtime's
    decision is one comparison: no framework call between pieces, and no PyTorch on the device.
    """

    def __init__(
        self, segment: nn.Module, head: nn.Module, last: bool, policy: str, normalize: bool
    ) -> None:
        super().__init__()
        self.segment, self.head, self.last = segment, head, last
        self.policy, self.normalize = policy, normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        features = self.segment(x)
        logits = self.head(features)
        if self.last:
            return logits
        return features, logits, exit_scores(logits, self.policy, self.normalize)


def exit_piece(model: nn.Module, i: int, policy: str, normalize: bool) -> nn.Module:
    """Piece i (0-based) of an EarlyExitNet: segment i fused with head i and its exit score."""
    last = i == len(model.segments) - 1
    return ExitPiece(model.segments[i], model.heads[i], last, policy, normalize).eval()


def static_network(model: nn.Module) -> nn.Module:
    """The plain network through the last exit, without the intermediate heads."""
    return nn.Sequential(*model.segments, model.heads[-1]).eval()


def _check_finite(model: nn.Module, run: RunDir) -> None:
    """Weights that hold NaN answer NaN for every image: refused before an export ships them."""
    bad = [
        k for k, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()
    ]
    if bad:
        raise ErdeError(
            f"{run.weights} holds NaN or infinite values ({bad[0]}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); the run diverged: retrain "
            "it (a lower train.lr, or train.precision=fp32) before exporting"
        )


def _check_destination(out_dir: Path, run: RunDir, overwrite: bool) -> None:
    """An export replaces its folder whole, so the folder must be erde's own export (or new, or
    empty), never the run, a folder inside it or one above it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ErdeError(f"--out {out_dir} is a file; give a folder path")
    source, out = run.path.resolve(), out_dir.resolve()
    if out == source or out in source.parents or source in out.parents:
        raise ErdeError(
            f"--out {out_dir} is the run {run}, inside it or above it, and an export replaces "
            "its folder whole; choose a folder outside the run"
        )
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not is_export(out_dir):
        raise ErdeError(
            f"{out_dir} is not empty and holds no erde export; erde replaces only folders it "
            "exported into: choose a new or empty --out folder"
        )
    foreign = sorted({p.name for p in out_dir.iterdir()} - export_files(out_dir))
    if foreign and not overwrite:
        raise ErdeError(
            f"{out_dir} holds an erde export and files it did not write ({', '.join(foreign)}), "
            "which a new export would delete; move them away, or pass --overwrite to delete them"
        )


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Swap the finished export in, so a failed export leaves the old folder as it was."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(staging, out_dir)
    except OSError:
        if old is not None:
            os.replace(old / out_dir.name, out_dir)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # the new export is in place whatever is left


def _write_failed(out_dir: Path, exc: OSError) -> ErdeError:
    """A full or read-only disk, named by the folder the user gave (not the hidden staging)."""
    fix = write_fix(out_dir.parent, exc, "choose another --out")
    return ErdeError(
        f"could not write the export {out_dir} ({exc.strerror or exc}); nothing half-written "
        f"is left and an earlier export there is unchanged: {fix}"
    )


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    threshold: float | None = None,
    policy: str | None = None,
    normalize: bool | None = None,
    opset: int = OPSET,
    int8: bool = False,
    overwrite: bool = False,
) -> Manifest:
    """Write one ONNX piece per exit, `single.onnx`, `static.onnx`, `manifest.json` and
    `DEPLOY.md` (the manifest in prose) into `out_dir`; returns the manifest as written
    (`Manifest.to_json()` is the file's contents).

    The threshold defaults to the one `erde evaluate` calibrated on val (re-chosen on the int8
    model with `int8=True`). An earlier erde export in `out_dir` is replaced (one that also holds
    files it did not write only with `overwrite=True`); any other non-empty folder, the run, or
    a folder around it, never.
    """
    check_opset(opset)
    check_exporter()
    run, out_dir = RunDir(run_dir), Path(out_dir)
    # One read of the weights: the graphs, the threshold's check and the manifest's digest all
    # belong to those bytes, whatever a concurrent `erde train` writes meanwhile.
    model, info, digest = load_run_model(run.path)
    check_finished(run.path, info, "run", "exporting it")
    _check_finite(model, run)
    point = deployment(run.path, threshold, policy, normalize, weights_sha256=digest)
    _check_destination(out_dir, run, overwrite)
    graphs = _graphs(run, model, info, point, opset, int8, digest)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # Not mkdtemp: its mode 0o700 would hide the export from the user's group.
        staging = out_dir.parent / f".{out_dir.name}.new.{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as exc:
        raise _write_failed(out_dir, exc) from None
    try:
        manifest = _write_export(staging, run, info, graphs, opset, digest)
        _replace_dir(staging, out_dir)
    except WriteFailed as exc:
        raise _write_failed(out_dir, exc.cause) from None
    except OSError as exc:
        raise _write_failed(out_dir, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


@dataclass(frozen=True)
class _Graphs:
    """What an export writes: its graphs, the deployment they decide with, and, for int8, the
    manifest's record of the quantization."""

    pieces: list[onnx.ModelProto]
    static: onnx.ModelProto
    point: Deployment
    budget_thresholds: dict[str, float]
    val_curve: dict | None
    quantization: dict | None = None

    @property
    def precision(self) -> str:
        return "fp32" if self.quantization is None else "int8"


def _graphs(
    run: RunDir,
    model: nn.Module,
    info: ModelInfo,
    point: Deployment,
    opset: int,
    int8: bool,
    digest: str,
) -> _Graphs:
    """The fp32 graphs, or with `int8` their quantized forms and the threshold re-chosen on them."""
    pieces, static = _export_graphs(
        model, info.data.in_channels, info.data.input_size, point, opset
    )
    budgets = {} if point.threshold_source == "given" else budget_thresholds(run.path, digest)
    if not int8:
        curve = val_curve(run.path, point.policy, point.normalize, digest)
        return _Graphs(pieces, static, point, budgets, curve)
    from erde.deploy.int8 import quantize_export

    q = quantize_export(run.path, info, pieces, static, point, digest)
    return _Graphs(q.pieces, q.static, q.point, q.budget_thresholds, q.val_curve, q.record)


def _write_export(
    folder: Path, run: RunDir, info: ModelInfo, graphs: _Graphs, opset: int, digest: str
) -> Manifest:
    """Every graph, the manifest that ties them and DEPLOY.md into `folder`; returns the
    manifest."""
    manifest = Manifest(
        info=info,
        deployment=graphs.point,
        pieces=[
            {"exit": i + 1, **save_graph(p, folder / f"exit{i + 1}.onnx")}
            for i, p in enumerate(graphs.pieces)
        ],
        static=save_graph(graphs.static, folder / STATIC),
        single=save_graph(single_graph(graphs.pieces), folder / SINGLE),
        precision=graphs.precision,
        budget_thresholds=graphs.budget_thresholds,
        quantization=graphs.quantization,
        opset=opset,
        exporter=f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        source_run=str(run.path.resolve()),
        weights_sha256=digest,
        val_curve=graphs.val_curve,
    )
    write_json(folder / MANIFEST, manifest.to_json())
    write_text(folder / DEPLOY_MD, deploy_md(manifest.to_json()))
    return manifest


def _export_graphs(
    model: nn.Module, channels: int, size: int, point: Deployment, opset: int
) -> tuple[list[onnx.ModelProto], onnx.ModelProto]:
    """One graph per exit and the static graph."""
    pieces = []
    x = torch.zeros(2, channels, size, size)  # batch 2: nothing may specialise on batch 1
    probe = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(0))
    n = len(model.segments)
    # Each graph takes seconds to trace: a bar, on a terminal only (as training's).
    bar = tqdm(total=n + 1, desc="export graphs", unit="graph", disable=None, leave=False)
    with torch.no_grad(), bar:
        for i, segment in enumerate(model.segments):
            outputs = (
                [f"logits{i + 1}"]
                if i == n - 1
                else [f"features{i + 1}", f"logits{i + 1}", f"score{i + 1}"]
            )
            piece = exit_piece(model, i, point.policy, point.normalize)
            name = "image" if i == 0 else f"features{i}"
            export = partial(export_graph, piece, x, name, outputs, opset)
            if i == n - 1:  # the last exit always answers: its graph holds no score
                graph = export()
            else:
                graph = traced(point.policy, i, export)
                check_scores(point.policy, i, graph, piece, probe)
            pieces.append(graph)
            bar.update()
            x, probe = segment(x), segment(probe)
        static = export_graph(
            static_network(model), torch.zeros(2, channels, size, size), "image", ["logits"], opset
        )
        bar.update()
    return pieces, static
