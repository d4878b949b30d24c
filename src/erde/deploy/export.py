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
import shutil
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

from erde.deploy.manifest import MANIFEST, Deployment, Manifest, is_export
from erde.deploy.onnx_export import OPSET, check_exporter, check_opset, export_graph, save_graph
from erde.deploy.single import single_graph
from erde.deploy.threshold import budget_thresholds, deployment
from erde.errors import ErdeError
from erde.evaluation.policy import exit_scores
from erde.files import sha256_file, write_json
from erde.models.load import load_model
from erde.run.checkpoint import check_finished
from erde.run.layout import RunDir

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


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ErdeError(f"--out {out_dir} is a file; give a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_export(out_dir) and not overwrite:
        raise ErdeError(
            f"{out_dir} is not empty and holds no erde export; choose another --out folder, "
            "or pass --overwrite to replace its contents"
        )


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Swap the finished export in, so a failed export leaves the old folder as it was."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old)


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
) -> dict:
    """Write one ONNX piece per exit, `single.onnx`, `static.onnx` and `manifest.json` into
    `out_dir`; returns the manifest as written.

    The threshold defaults to the one `erde evaluate` calibrated on val (re-chosen on the int8
    model with `int8=True`). An earlier erde export in `out_dir` is replaced; any other non-empty
    folder only with `overwrite=True`.
    """
    check_opset(opset)
    check_exporter()
    run, out_dir = RunDir(run_dir), Path(out_dir)
    model, info = load_model(run.path)
    check_finished(run.path, info, "run", "exporting it")
    point = deployment(run.path, threshold, policy, normalize)
    _check_destination(out_dir, overwrite)
    pieces, static = _export_graphs(
        model, info.data.in_channels, info.data.input_size, point, opset
    )
    budgets = {} if point.threshold_source == "given" else budget_thresholds(run.path)
    quantization = None
    if int8:
        from erde.deploy.int8 import quantize_export

        q = quantize_export(run.path, info, pieces, static, point)
        pieces, static, point, budgets, quantization = (
            q.pieces,
            q.static,
            q.point,
            q.budget_thresholds,
            q.record,
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new.", dir=out_dir.parent))
    try:
        manifest = Manifest(
            info=info,
            deployment=point,
            pieces=[
                {"exit": i + 1, **save_graph(p, staging / f"exit{i + 1}.onnx")}
                for i, p in enumerate(pieces)
            ],
            static=save_graph(static, staging / STATIC),
            single=save_graph(single_graph(pieces), staging / SINGLE),
            precision="int8" if int8 else "fp32",
            budget_thresholds=budgets,
            quantization=quantization,
            opset=opset,
            exporter=f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            source_run=str(run.path.resolve()),
            weights_sha256=sha256_file(run.weights),
        ).to_json()
        write_json(staging / MANIFEST, manifest)
        _replace_dir(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


def _export_graphs(
    model: nn.Module, channels: int, size: int, point: Deployment, opset: int
) -> tuple[list[onnx.ModelProto], onnx.ModelProto]:
    """One graph per exit and the static graph."""
    pieces = []
    x = torch.zeros(2, channels, size, size)  # batch 2: nothing may specialise on batch 1
    n = len(model.segments)
    with torch.no_grad():
        for i, segment in enumerate(model.segments):
            outputs = (
                [f"logits{i + 1}"]
                if i == n - 1
                else [f"features{i + 1}", f"logits{i + 1}", f"score{i + 1}"]
            )
            piece = exit_piece(model, i, point.policy, point.normalize)
            pieces.append(
                export_graph(piece, x, "image" if i == 0 else f"features{i}", outputs, opset)
            )
            x = segment(x)
        static = export_graph(
            static_network(model), torch.zeros(2, channels, size, size), "image", ["logits"], opset
        )
    return pieces, static
