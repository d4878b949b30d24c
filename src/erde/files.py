"""Files the project writes and reads back: atomic writes, JSON, SHA-256.

Files are serialised in memory and then written by `atomic_write`, so a full disk or a read-only
folder surfaces as one `OSError` from our own write, turned into a clear message, and never as a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic_core

from erde.errors import ErdeError

# The temporary of `atomic_write`: `.NAME.` + 8 hex digits + `.tmp`.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


class WriteFailed(ErdeError):
    """A write the disk refused (full, over quota, read-only, no permission): the message names
    the file and the fix; `cause` is the operating system's error, for callers that name a
    larger unit (an export folder) instead."""

    def __init__(self, message: str, cause: OSError) -> None:
        super().__init__(message)
        self.cause = cause


def write_fix(folder: Path, exc: OSError, elsewhere: str | None = None) -> str:
    """What to do when the system refused a write into `folder`, by the error's kind;
    `elsewhere` names the other destination a command can be given (default: --out)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free disk space (or raise the quota) and run the command again"
        return f"{fix}, or {elsewhere}" if elsewhere else fix
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {folder} writable, or {elsewhere or 'write to another folder (--out)'}"
    return "check the folder and the disk, then run the command again"


def write_failed(path: Path, exc: OSError) -> WriteFailed:
    """The message for a write the disk refused; the previous file, if any, is still in place."""
    return WriteFailed(
        f"could not write {path} ({exc.strerror or exc}); its previous version, if any, is "
        f"unchanged: {write_fix(path.parent, exc)}",
        exc,
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
        raise write_failed(path, exc) from exc


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


def jsonable(obj: Any) -> Any:
    """Plain JSON values; NaN and infinities become null so strict parsers accept the file."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Indented, key-sorted JSON; accepts numpy/torch values and dataclasses."""
    text = json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_text(Path(path), text)


def parse_json(text: str | bytes) -> Any:
    """JSON text as Python values, by pydantic's parser: nesting beyond its depth limit, an
    integer beyond any float and invalid UTF-8 are a ValueError like any malformed text (Python's
    `json` raises RecursionError on deep nesting)."""
    return pydantic_core.from_json(text)


def read_json(path: Path, what: str) -> Any:
    """A JSON file the project wrote; `what` names it in the message when it is missing or bad."""
    try:
        return parse_json(Path(path).read_bytes())
    except FileNotFoundError:
        raise ErdeError(f"{what} {path} is missing; is this a finished erde run folder?") from None
    except ValueError as exc:
        raise ErdeError(f"{what} {path} is corrupt ({exc}); retrain or restore the file") from None


def sha256_bytes(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
