"""Run-folder files: weights (safetensors + JSON sidecar), resumable training state, atomic writes.

Nothing here unpickles arbitrary objects: weights are safetensors, the training state is read with
`torch.load(weights_only=True)`, metadata is JSON. Files are serialised in memory and then written
by `atomic_write`, so a full disk or a read-only folder surfaces as one `OSError` from our own
write, turned into a clear message, and never as a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from erde.errors import ErdeError

WEIGHTS = "model.safetensors"
SIDECAR = "model.json"
STATE = "state.pt"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
# What `fit` stores in STATE and needs back to resume (a multi-process run adds per-rank streams).
STATE_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "rng_cpu")
SIDECAR_KEYS = ("arch", "exit_macs", "data")
# The temporary of `atomic_write`: `.NAME.` + 8 hex digits + `.tmp`.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def _write_failed(path: Path, exc: OSError) -> ErdeError:
    """The message for a write the disk refused; the previous file, if any, is still in place."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free disk space (or raise the quota) and run the command again"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {path.parent} writable, or write to another folder (--out)"
    else:
        fix = "check the folder and the disk, then run the command again"
    return ErdeError(
        f"could not write {path} ({exc.strerror or exc}); its previous version, if any, is "
        f"unchanged: {fix}"
    )


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write a temporary file in the same folder, then rename: readers never see half a file.

    The temporary is created with mode 0o666 minus the umask, like any file the user writes
    (mkstemp's 0o600 would hide results from the user's group). After the rename the folder is
    synced too, so the new name survives a power cut, not only a killed process.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            write(str(tmp))
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        if os.name == "posix":
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    except OSError as exc:
        raise _write_failed(path, exc) from exc


def temporaries(folder: Path) -> list[Path]:
    """What `atomic_write`s that were killed midway left in `folder` (none if it is missing)."""
    return [p for p in Path(folder).glob(".*.tmp") if _TEMPORARY.fullmatch(p.name)]


def write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


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
    write_bytes(run_dir / name, safetensors_bytes(state))
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
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(run_dir / STATE, buffer.getvalue())


def load_state(run_dir: Path) -> dict | None:
    """The training state to resume from, refused unless it holds only tensors and plain values;
    None when the run stopped before its first epoch ended (it resumes from the start)."""
    path = Path(run_dir) / STATE
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


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_model(run_dir: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """The trained EarlyExitNet of a run folder, in eval mode, and its sidecar."""
    from erde.models import create_model

    state, meta = load_weights(Path(run_dir))
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise ErdeError(
            f"{Path(run_dir) / SIDECAR} has no {', '.join(repr(k) for k in missing)} entry; "
            "it was not written by erde"
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
