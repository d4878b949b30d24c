"""A torch module as one checked ONNX graph, with PyTorch's supported exporter.

`torch.onnx.export(..., dynamo=True)`: torch.export captures the module and onnxscript translates
it; the output shapes come from the exported program, so nothing is patched by hand, and the
graph is written inline (no external-data files; erde's graphs are a few MB). The exporter needs
the `onnxscript` package: where it is missing, export stops with a message saying so, while
inference (ONNX Runtime only) keeps working.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.torch_version import TorchVersion

from erde.errors import ErdeError
from erde.files import sha256_file, write_bytes

BATCH = "batch"  # name of the dynamic batch dimension in every graph
# The opsets the exporter writes natively (onnxscript's torchlib targets 18; lower ones would go
# through the version converter) and that ONNX Runtime >= 1.17 runs.
OPSETS = range(18, 21)
OPSET = 18
MIN_TORCH = "2.6"  # the first release whose dynamo exporter takes every argument used here


def check_exporter() -> None:
    """Refuse before any work where the exporter cannot run."""
    if TorchVersion(torch.__version__) < MIN_TORCH:
        raise ErdeError(
            f"ONNX export needs PyTorch >= {MIN_TORCH} (torch.onnx.export with dynamo=True and "
            f"dynamic shapes); this is {torch.__version__}. Upgrade torch, or export elsewhere "
            "and copy the folder: `erde infer` needs only ONNX Runtime"
        )
    if importlib.util.find_spec("onnxscript") is None:
        raise ErdeError(
            "ONNX export needs the onnxscript package (torch.onnx.export with dynamo=True), which "
            "is not installed here; `pip install onnxscript`, or export on another machine and "
            "copy the folder: `erde infer` and `erde bench EXPORT_DIR` need only ONNX Runtime"
        )


def check_opset(opset: int) -> None:
    if opset not in OPSETS:
        raise ErdeError(
            f"ONNX opset {opset} is not supported; choose one from {OPSETS[0]} to {OPSETS[-1]} "
            f"(--opset, default {OPSET})"
        )


def export_graph(
    module: nn.Module,
    example: torch.Tensor,
    input_name: str,
    output_names: list[str],
    opset: int = OPSET,
) -> onnx.ModelProto:
    """The module's graph with a dynamic batch dimension (the example's batch must not be 1, or
    the exporter may specialise on it)."""
    check_exporter()
    check_opset(opset)
    program = torch.onnx.export(
        module.eval(),
        (example,),
        dynamo=True,
        input_names=[input_name],
        output_names=output_names,
        dynamic_shapes=({0: torch.export.Dim(BATCH)},),
        opset_version=opset,
        external_data=False,
        optimize=True,
        verbose=False,
    )
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    return proto


def shapes(values) -> list[dict]:
    """Names and shapes of graph inputs or outputs, as the manifest lists them."""
    return [
        {
            "name": v.name,
            "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        }
        for v in values
    ]


def save_graph(proto: onnx.ModelProto, path: Path) -> dict:
    """Write one graph (inline, one file) and return its manifest entry: file, sha256, inputs
    and outputs (names and shapes)."""
    write_bytes(path, proto.SerializeToString())
    return {
        "file": path.name,
        "sha256": sha256_file(path),
        "inputs": shapes(proto.graph.input),
        "outputs": shapes(proto.graph.output),
    }
