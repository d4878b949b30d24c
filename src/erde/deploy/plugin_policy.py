"""A plugin's exit policy in an exported graph: traced, and giving the scores PyTorch gives.

erde's own policies are tested through ONNX Runtime (tests/test_deploy.py); a user's function
is checked at export, because the exporter can fail on it (Python branches on tensor values) or,
worse, succeed with a graph that answers otherwise (a loop over the batch fixed to the example's
size). The runtime would then take other exits than the evaluation predicted, without a word.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from erde.errors import ErdeError
from erde.evaluation.policies import get_policy

FIX = "write its score with tensor operations only (no .item(), loops or Python branches on values)"
ATOL = 1e-4  # ONNX Runtime against PyTorch, float32 scores


def traced(name: str, i: int, export: Callable[[], onnx.ModelProto]) -> onnx.ModelProto:
    """`export()`, with a plugin policy's tracing failure as one line (erde's own: as raised)."""
    try:
        return export()
    except Exception as exc:
        policy = get_policy(name)
        if policy.builtin:
            raise
        problem = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(exc).split()))[:160]
        raise ErdeError(
            f"exit {i + 1}'s ONNX graph could not be traced with the exit policy {name!r} "
            f"({policy.score.__module__}) ({type(exc).__name__}: {problem}); {FIX}"
        ) from None


def check_scores(name: str, i: int, graph: onnx.ModelProto, piece: nn.Module, x: torch.Tensor):
    """The graph's exit scores on `x` (a batch of another size than the traced example) equal
    the piece's in PyTorch, for a plugin policy."""
    policy = get_policy(name)
    if policy.builtin:
        return
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    want = piece(x)[2].numpy()
    try:
        got = session.run(None, {graph.graph.input[0].name: x.numpy()})[2]
    except Exception as exc:  # ONNX Runtime's own errors, e.g. a batch size fixed in the graph
        got, problem = None, f"fails on a batch of {len(x)} ({type(exc).__name__})"
    if got is not None:
        if got.shape == want.shape and np.allclose(got, want, rtol=1e-3, atol=ATOL):
            return
        problem = f"gives other scores than PyTorch on a batch of {len(x)}"
    raise ErdeError(
        f"exit {i + 1}'s ONNX graph with the exit policy {name!r} ({policy.score.__module__}) "
        f"{problem}: the exporter traced something else than the function computes; {FIX}"
    )
