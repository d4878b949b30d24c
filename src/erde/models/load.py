"""A run folder's trained network, rebuilt from its sidecar and loaded with its weights."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from erde.errors import ErdeError
from erde.models.plugins import check_trusted
from erde.models.registry import create_model
from erde.run.checkpoint import read_weights
from erde.run.layout import RunDir
from erde.run.model_info import ModelInfo


def _check_dtypes(state: dict, expected: dict, path: Path) -> None:
    """Each tensor in the dtype the model holds: load_state_dict would cast silently (int64
    weights into float32, say), turning a foreign or damaged file into a wrong model."""
    for key, tensor in state.items():
        if key in expected and tensor.dtype != expected[key].dtype:
            raise ErdeError(
                f"{path}: tensor {key!r} is {tensor.dtype} where the model holds "
                f"{expected[key].dtype}; the file was not written by erde or is damaged: "
                "retrain the run or restore the file"
            )


class RunModel(NamedTuple):
    """A run's network with its sidecar and the SHA-256 of the bytes its weights came from."""

    model: torch.nn.Module
    info: ModelInfo
    weights_sha256: str


def load_run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> RunModel:
    """The trained EarlyExitNet of a run folder, in eval mode, its sidecar and the digest of
    the weights it holds (`erde.run.checkpoint.Weights`: what an export or cache records)."""
    state, info, digest = read_weights(run_dir)
    if info.arch.get("module"):
        check_trusted(info.arch["module"], str(RunDir(run_dir).sidecar))
    model = create_model(**info.arch)
    _check_dtypes(state, model.state_dict(), RunDir(run_dir).weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ErdeError(
            f"the weights in {run_dir} do not fit the architecture its sidecar names "
            f"({str(exc).splitlines()[0]}); the folder mixes files of two runs"
        ) from None
    return RunModel(model.to(device).eval(), info, digest)


def load_model(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ModelInfo]:
    """The trained EarlyExitNet of a run folder, in eval mode, and its sidecar."""
    model, info, _ = load_run_model(run_dir, device)
    return model, info


__all__ = ["RunModel", "load_model", "load_run_model"]
