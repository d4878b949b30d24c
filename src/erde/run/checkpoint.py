"""A run's weights (safetensors + `ModelInfo` sidecar) and its resumable training state.

Nothing here unpickles arbitrary objects: weights are safetensors, the training state is read with
`torch.load(weights_only=True)`, metadata is JSON. Everything is written through
`erde.files.write_bytes` (atomic, clear message on a full or read-only disk).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from erde.errors import ErdeError
from erde.files import sha256_bytes, write_bytes
from erde.run.layout import RunDir
from erde.run.model_info import ModelInfo

# What `fit` stores in the state file and needs back to resume (a multi-process run adds
# per-rank streams).
STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "rng_cpu")


def check_finished(run_dir: str | Path, info: ModelInfo, what: str, before: str) -> None:
    """Refuse the weights of a run that is still training or was stopped: whatever is measured,
    chosen or distilled from them would belong to weights the run then replaces."""
    if not info.finished:
        raise ErdeError(
            f"{what} {run_dir} has not finished training (epoch {info.epoch} of {info.epochs}); "
            f"finish it (`erde train --resume --out {run_dir}`) before {before}"
        )


def save_weights(
    path: Path, model: torch.nn.Module, info: ModelInfo, sidecar: Path | None = None
) -> None:
    """Weights plus the sidecar that says how to rebuild the model and what data it expects
    (default sidecar: the weights' name with `.json`)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_bytes(path, safetensors_bytes(state))
    info.write(sidecar or path.with_suffix(".json"))


class Weights(NamedTuple):
    """A run's weights read once: the tensors, the sidecar, and the SHA-256 of the very bytes the
    tensors came from. A manifest, a logits cache or a teacher record that digest, never one of
    the file hashed later: a concurrent `erde train` may have replaced the file in between."""

    state: dict[str, torch.Tensor]
    info: ModelInfo
    sha256: str


def read_weights(run_dir: str | Path) -> Weights:
    """The weights file read into memory once (it is replaced whole, by rename, so the bytes are
    one complete version), then hashed and parsed from those bytes."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise ErdeError(f"run folder {run} does not exist; give the folder `erde train` wrote")
    if not run.weights.is_file():
        raise ErdeError(
            f"{run.weights} is missing: {run} holds no trained model yet "
            "(train it with `erde train`, or give another run folder)"
        )
    info = ModelInfo.read(run.sidecar)
    try:
        blob = run.weights.read_bytes()
        state = safetensors_load(blob)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ErdeError(
            f"{run.weights} is not a readable safetensors file ({exc}); retrain the run or "
            "restore the file"
        ) from None
    return Weights(state, info, sha256_bytes(blob))


def load_weights(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], ModelInfo]:
    weights = read_weights(run_dir)
    return weights.state, weights.info


def read_info(run_dir: str | Path) -> ModelInfo:
    """The sidecar of a run that has weights (the same checks as `load_weights`, no tensors)."""
    run = RunDir(run_dir)
    if not run.weights.is_file():
        load_weights(run_dir)  # the message for a missing folder or missing weights
    return ModelInfo.read(run.sidecar)


def save_state(run_dir: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(RunDir(run_dir).state, buffer.getvalue())


def load_state(run_dir: Path) -> dict | None:
    """The training state to resume from, refused unless it holds only tensors and plain values;
    None when the run stopped before its first epoch ended (it resumes from the start)."""
    path = RunDir(run_dir).state
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors of every kind end here: the file is refused
        raise ErdeError(
            f"{path} is not a safe erde training state ({type(exc).__name__}): it is corrupt, "
            "or it holds objects that erde never unpickles; start the run again with --overwrite"
        ) from None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ErdeError(
            f"{path} lacks {', '.join(missing)}, so it was not written by `erde train`; "
            "start the run again with --overwrite"
        )
    return state
