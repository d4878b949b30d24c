"""A trained run as ONNX pieces that a runtime can stop between, plus the manifest that ties them.

Piece i holds segment i and head i fused, with two outputs: the features the next segment needs
and the logits of exit i (the last piece has only logits). Running piece 1, deciding per image and
feeding only the undecided images to piece 2 is then real early exit: the skipped images never
touch the rest of the network. `static.onnx` is the plain network (every segment and the final
head, no intermediate heads), the honest no-early-exit baseline for benchmarks and for users who
want it.

Exporter: torch's default `torch.onnx.export(dynamo=True)` needs `onnxscript`, which erde does not
depend on, so the TorchScript-based exporter (`dynamo=False`) is used; it handles every registered
backbone (convolutions, BatchNorm, pooling, flatten, linear) with a dynamic batch dimension.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from erde import checkpoint as ckpt
from erde.deploy.manifest import MANIFEST, Deployment, Manifest, is_export
from erde.deploy.threshold import deployment
from erde.errors import ErdeError
from erde.evaluation.policy import exit_scores
from erde.files import sha256_file, write_json
from erde.rundir import RunDir

STATIC = "static.onnx"
BATCH = "batch"  # name of the dynamic batch dimension in every graph
# Opsets every backbone exports at: Slice with steps (option-A shortcuts) needs 10, and 20 is the
# highest the TorchScript exporter writes.
OPSETS = range(10, 21)


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


def export_onnx(
    module: nn.Module,
    path: Path,
    example: torch.Tensor,
    input_name: str,
    output_names: list[str],
    opset: int = 17,
) -> dict:
    """One graph with a dynamic batch dimension, checked by `onnx.checker`; returns its entry
    for the manifest (file, sha256, input/output names and shapes)."""
    axes = {name: {0: BATCH} for name in [input_name, *output_names]}
    with warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation; see the module docstring.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        # Stride-2 slices (option-A shortcuts) are not folded; harmless, and said once per graph.
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=[input_name],
            output_names=output_names,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    # Shape inference loses the static sizes behind some ops (the strided slices of option-A
    # shortcuts); the sizes torch computes are written into the graph so it describes itself,
    # and the full check's shape inference then confirms them.
    with torch.no_grad():
        outputs = module(example)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    proto = onnx.load(str(path))
    for value, tensor in zip(proto.graph.output, outputs, strict=True):
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_param = BATCH
        for dim, size in zip(dims[1:], tensor.shape[1:], strict=True):
            dim.dim_value = size
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)

    def shapes(values) -> list[dict]:
        return [
            {
                "name": v.name,
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "inputs": shapes(proto.graph.input),
        "outputs": shapes(proto.graph.output),
    }


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
    opset: int = 17,
    overwrite: bool = False,
) -> dict:
    """Write one ONNX piece per exit, `static.onnx` and `manifest.json` into `out_dir`; returns
    the manifest as written.

    The threshold defaults to the one `erde evaluate` calibrated on val. An earlier erde export
    in `out_dir` is replaced; any other non-empty folder only with `overwrite=True`.
    """
    if opset not in OPSETS:
        raise ErdeError(
            f"ONNX opset {opset} is not supported; choose one from {OPSETS[0]} to {OPSETS[-1]} "
            "(--opset, default 17)"
        )
    run, out_dir = RunDir(run_dir), Path(out_dir)
    model, info = ckpt.load_model(run.path)
    point = deployment(run.path, threshold, policy, normalize)
    _check_destination(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new.", dir=out_dir.parent))
    try:
        pieces, static = _export_pieces(
            model, info.data.in_channels, info.data.input_size, point, staging, opset
        )
        manifest = Manifest(
            info=info,
            deployment=point,
            pieces=pieces,
            static=static,
            opset=opset,
            exporter=f"torch.onnx.export(dynamo=False), torch {torch.__version__}",
            source_run=str(run.path.resolve()),
            weights_sha256=sha256_file(run.weights),
        ).to_json()
        write_json(staging / MANIFEST, manifest)
        _replace_dir(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


def _export_pieces(
    model: nn.Module, channels: int, size: int, point: Deployment, folder: Path, opset: int
) -> tuple[list[dict], dict]:
    """One graph per exit and the static graph; their manifest entries."""
    pieces = []
    x = torch.zeros(2, channels, size, size)  # batch 2: nothing may specialise on batch 1
    n = len(model.segments)
    with torch.no_grad():
        for i, segment in enumerate(model.segments):
            last = i == n - 1
            outputs = (
                [f"logits{i + 1}"]
                if last
                else [f"features{i + 1}", f"logits{i + 1}", f"score{i + 1}"]
            )
            entry = export_onnx(
                exit_piece(model, i, point.policy, point.normalize),
                folder / f"exit{i + 1}.onnx",
                x,
                "image" if i == 0 else f"features{i}",
                outputs,
                opset,
            )
            pieces.append({"exit": i + 1, **entry})
            x = segment(x)
        static = export_onnx(
            static_network(model),
            folder / STATIC,
            torch.zeros(2, channels, size, size),
            "image",
            ["logits"],
            opset,
        )
    return pieces, static
