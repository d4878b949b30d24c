"""`erde export --format executorch`: a run as one ExecuTorch program whose early exit is a branch.

`early_exit.pte` takes one image (1 x C x H x W, normalised float32) and `thresholds` (float32,
one per deciding exit) and answers `logits` (1 x K) and `exit` (1, numbered 1..n), as
`single.onnx` does (erde.deploy.single):

    piece 1 -> (features1, logits1), score1 = exit_scores(logits1)
    cond(score1 < thresholds[0]):  (logits1, 1)
                                   else piece 2 -> ... cond(score2 < thresholds[1]) ... last piece

Each piece (segment and head) is lowered to XNNPACK on its own first (every operator XNNPACK
takes; `xnnpack` in executorch.json counts them), then the branch is traced around the lowered
pieces: ExecuTorch's interpreter runs only the branch taken, so an image that leaves at exit 1
never enters piece 2's delegate. XNNPACK's partitioner does not look inside a `cond`'s branches
(where the weights arrive as branch inputs, not constants), so lowering the traced branch whole
would leave every piece after the first on the slow portable kernels. The score is
`erde.evaluation.policy.exit_scores`, the simulator's formula, on ExecuTorch's portable kernels.

The branch is `torch.ops.higher_order.cond`, the operator `torch.cond` calls: `torch.cond`
itself first compiles its branches with TorchDynamo, which cannot trace a call into an already
lowered module (executorch 1.5.1, torch 2.14.1: "Please convert all Tensors to FakeTensors
first"), while the operator traces them with make_fx, which can.
"""

from __future__ import annotations

import importlib.util
import logging
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

from erde.deploy.executorch_files import PTE, SPEC, check_destination, spec_json
from erde.deploy.threshold import deployment
from erde.errors import ErdeError
from erde.evaluation.policy import exit_scores
from erde.files import sha256_bytes, sha256_file, write_bytes, write_json
from erde.models.load import load_model
from erde.run.checkpoint import check_finished
from erde.run.layout import RunDir
from erde.run.model_info import ModelInfo

INSTALL = "pip install 'erde[executorch]'"


def check_executorch() -> None:
    """Refuse before any work where ExecuTorch is not installed (it is an optional extra)."""
    if importlib.util.find_spec("executorch") is None:
        raise ErdeError(
            "ExecuTorch export and runtime need the executorch package, which is not installed "
            f"here; {INSTALL} (or export with the default --format onnx)"
        )


def quiet_import() -> None:
    """Import ExecuTorch without the deprecation warning its torchao import logs on every
    start (torch's pytree logger), which would break erde's one-line messages."""
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import executorch.exir  # noqa: F401
    finally:
        logger.setLevel(level)


class _Piece(nn.Module):
    """Segment then head: (features, logits), or the logits alone for the last piece."""

    def __init__(self, segment: nn.Module, head: nn.Module, last: bool) -> None:
        super().__init__()
        self.segment, self.head, self.last = segment, head, last

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.segment(x)
        logits = self.head(features)
        return logits if self.last else (features, logits)


class _Branch(nn.Module):
    """The lowered pieces chained by one `cond` per deciding exit."""

    def __init__(self, pieces: list[nn.Module], policy: str, normalize: bool) -> None:
        super().__init__()
        self.pieces = nn.ModuleList(pieces)
        self.policy, self.normalize = policy, normalize

    def forward(self, image: torch.Tensor, thresholds: torch.Tensor):
        return self._from(0, image, thresholds)

    def _from(self, k: int, x: torch.Tensor, thresholds: torch.Tensor):
        if k == len(self.pieces) - 1:
            return self.pieces[k](x), torch.full((1,), k + 1, dtype=torch.int64)
        features, logits = self.pieces[k](x)
        score = exit_scores(logits, self.policy, self.normalize)

        def leave(logits, features, thresholds):
            return logits.clone(), torch.full((1,), k + 1, dtype=torch.int64)

        def go_on(logits, features, thresholds):
            return self._from(k + 1, features, thresholds)

        operands = (logits, features, thresholds)
        return torch.ops.higher_order.cond(score[0] < thresholds[k], leave, go_on, operands)


def _lowered(piece: nn.Module, x: torch.Tensor) -> tuple[nn.Module, dict]:
    """One piece lowered to XNNPACK (as a module the branch can call) and its operator count."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(
        torch.export.export(piece, (x,)), partitioner=[XnnpackPartitioner()]
    )
    program = edge.exported_program()
    info = get_delegation_info(program.graph_module)
    return program.module(), {
        "delegated_ops": info.num_delegated_nodes,
        "portable_ops": info.num_non_delegated_nodes,
    }


def branch_program(
    model: nn.Module, info: ModelInfo, policy: str, normalize: bool
) -> tuple[bytes, list[dict]]:
    """The `.pte` bytes of the model's early-exit branch, and per exit what XNNPACK took."""
    check_executorch()
    quiet_import()
    from executorch.exir import to_edge

    d, n = info.data, len(model.segments)
    x = torch.zeros(1, d.in_channels, d.input_size, d.input_size)
    pieces, counts = [], []
    with torch.no_grad():
        for i, (segment, head) in enumerate(zip(model.segments, model.heads, strict=True)):
            module, count = _lowered(_Piece(segment, head, i == n - 1).eval(), x)
            pieces.append(module)
            counts.append({"exit": i + 1, **count})
            x = segment(x)
        image = torch.zeros(1, d.in_channels, d.input_size, d.input_size)
        branch = _Branch(pieces, policy, normalize)  # the lowered pieces have no train mode
        program = torch.export.export(branch, (image, torch.zeros(n - 1)))
    try:
        return to_edge(program).to_executorch().buffer, counts
    except RuntimeError as exc:  # MobileNetV3: constants a piece keeps off XNNPACK (README)
        reason = str(exc).strip().splitlines()[0][:160]
        raise ErdeError(
            f"ExecuTorch {version('executorch')} cannot build the early-exit branch of "
            f"{info.name} ({type(exc).__name__}: {reason}); export it as ONNX instead "
            "(--format onnx, the default)"
        ) from exc


def export_executorch(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    threshold: float | None = None,
    policy: str | None = None,
    normalize: bool | None = None,
) -> dict:
    """Write `early_exit.pte` and `executorch.json` (what the program is and how it decides)
    into `out_dir`; the threshold defaults to the one `erde evaluate` calibrated on val.
    Returns the spec as written."""
    check_executorch()
    run, out_dir = RunDir(run_dir), Path(out_dir)
    model, info = load_model(run.path)
    check_finished(run.path, info, "run", "exporting it")
    point = deployment(run.path, threshold, policy, normalize)
    check_destination(out_dir, run.path)
    blob, counts = branch_program(model, info, point.policy, point.normalize)
    spec = spec_json(
        info,
        point,
        sha256_bytes(blob),
        counts,
        exporter=f"executorch {version('executorch')}, torch {torch.__version__}",
        source_run=str(run.path.resolve()),
        weights_sha256=sha256_file(run.weights),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes(out_dir / PTE, blob)
    write_json(out_dir / SPEC, spec)
    return spec
