"""Run-folder files: weights (safetensors + JSON sidecar), resumable training state, atomic writes.

Nothing here unpickles arbitrary objects: weights are safetensors, the training state is read with
`torch.load(weights_only=True)`, metadata is JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from erde.errors import ErdeError

WEIGHTS = "model.safetensors"
SIDECAR = "model.json"
STATE = "state.pt"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ErdeError(f"{what} {path} is missing; is this a finished erde run folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ErdeError(f"{what} {path} is corrupt ({exc}); retrain or restore the file") from None


def save_weights(run_dir: Path, model: torch.nn.Module, meta: dict, name: str = WEIGHTS) -> None:
    """Weights plus the sidecar that says how to rebuild the model and what data it expects."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(run_dir / name, lambda tmp: save_file(state, tmp))
    write_json(run_dir / (Path(name).stem + ".json"), meta)


def load_weights(run_dir: Path, name: str = WEIGHTS) -> tuple[dict[str, torch.Tensor], dict]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ErdeError(f"run folder {run_dir} does not exist; give the folder `erde train` wrote")
    path = run_dir / name
    if not path.is_file():
        raise ErdeError(
            f"{path} is missing: {run_dir} holds no trained model yet "
            "(train it with `erde train`, or give another run folder)"
        )
    meta = read_json(run_dir / (Path(name).stem + ".json"), "model sidecar")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ErdeError(
            f"{path} is not a readable safetensors file ({exc}); retrain the run or "
            "restore the file"
        ) from None
    return state, meta


def save_state(run_dir: Path, state: dict) -> None:
    atomic_write(run_dir / STATE, lambda tmp: torch.save(state, tmp))


def load_state(run_dir: Path) -> dict:
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise ErdeError(
            f"{path} is missing, so there is nothing to resume; start the run without --resume"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors of every kind end here: the file is refused
        raise ErdeError(
            f"{path} cannot be loaded safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); it is corrupt or not "
            "an erde training state — start again with --overwrite"
        ) from None


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_model(run_dir: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The trained EarlyExitNet of a run folder, in eval mode, and its sidecar."""
    from erde.models import create_model

    state, meta = load_weights(Path(run_dir))
    if "arch" not in meta:
        raise ErdeError(
            f"{Path(run_dir) / SIDECAR} has no 'arch' entry; it was not written by erde"
        )
    model = create_model(**meta["arch"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ErdeError(
            f"the weights in {run_dir} do not fit the architecture its sidecar names "
            f"({str(exc).splitlines()[0]}); the folder mixes files of two runs"
        ) from None
    return model.to(device).eval(), meta
