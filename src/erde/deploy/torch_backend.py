"""The PyTorch side of the runtime: pieces run eagerly from a run folder's checkpoint
(`EarlyExitRuntime.from_run`), and every exit's logits of a chain of pieces for the int8 check
and the benchmark. Kept apart from `erde.deploy.runtime` so that the ONNX Runtime path does not
import PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from erde.deploy.manifest import Deployment
from erde.deploy.threshold import deployment
from erde.evaluation.policy import exit_scores
from erde.models.load import load_run_model
from erde.run.model_info import ModelInfo

# `erde.deploy.runtime.Piece`, spelt out: that module imports this one (in `from_run`)
Outputs = tuple[np.ndarray | None, np.ndarray, np.ndarray | None]
Piece = Callable[[np.ndarray], Outputs]


def _torch_piece(
    segment: torch.nn.Module, head: torch.nn.Module, last: bool, policy: str, normalize: bool
) -> Piece:
    def run(x: np.ndarray) -> Outputs:
        with torch.inference_mode():
            features = segment(torch.from_numpy(np.asarray(x)))
            logits = head(features).float()
            if last:
                return None, logits.numpy(), None
            scores = exit_scores(logits, policy, normalize)
            return features.numpy(), logits.numpy(), scores.numpy()

    return run


def run_pieces(
    run_dir: str | Path, threshold: float | None, policy: str | None, normalize: bool | None
) -> tuple[list[Piece], ModelInfo, Deployment]:
    """One eager piece per exit of the run's model, its info and deployment point."""
    model, info, digest = load_run_model(run_dir)
    point = deployment(run_dir, threshold, policy, normalize, weights_sha256=digest)
    n = len(model.segments)
    pieces = [
        _torch_piece(s, h, i == n - 1, point.policy, point.normalize)
        for i, (s, h) in enumerate(zip(model.segments, model.heads, strict=True))
    ]
    return pieces, info, point


def exit_logits(pieces: Sequence[Piece], x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Every exit's logits (N x E x K) of pieces run in a chain with no early exit: the outputs
    the simulator takes, from the very graphs the runtime runs (fp32 or int8)."""
    parts = []
    for start in range(0, len(x), batch_size):
        features, per_exit = x[start : start + batch_size].numpy(), []
        for piece in pieces:
            features, logits, _ = piece(features)
            per_exit.append(torch.from_numpy(np.asarray(logits)))
        parts.append(torch.stack(per_exit, dim=1))
    return torch.cat(parts)
