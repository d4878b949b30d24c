"""Advisory file locks, so that processes sharing a study folder never train the same run twice.

Shards of one study (several terminals, a SLURM array) run on one file system: the teacher is
trained by whichever process takes its lock first while the others wait, and a student whose lock
another process holds is skipped. Locks live in `.locks/` beside the runs (`fcntl.flock`: local
file systems and NFSv4), and the operating system drops them when their process dies, so a killed
process never leaves a run locked.

`writer_lock` is the other rule: one writer per run folder. `erde train` and `erde evaluate` hold
it while they write a run, and a second process is refused at once with the pid and command of
the first, which it reads from the lock file: the holder writes them there once it holds the lock
(plain `flock` and file contents, the same on every POSIX system).

Both are keyed by the folder's resolved path (`os.path.realpath`): a folder reached through a
symbolic link, or spelled with `..`, has the one lock of the folder it names.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from erde.errors import ErdeError

log = logging.getLogger("erde.study.reproduce")
_HELD: dict[Path, int] = {}  # writer locks this process holds: how often it entered each


def resolved(folder: str | Path) -> Path:
    """The folder a path names, links and `..` followed: what a lock is keyed by."""
    return Path(os.path.realpath(folder))


def lock_path(run: Path) -> Path:
    """The lock file of a run folder (or of any folder, such as a teacher cache)."""
    run = resolved(run)
    return run.parent / ".locks" / f"{run.name}.lock"


@contextmanager
def run_lock(run: Path, *, wait: bool) -> Iterator[bool]:
    """Hold the lock of `run` for the `with` block; yields False when `wait` is False and
    another process holds it (then nothing is held)."""
    path = lock_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            log.info("%s: another process holds it, waiting", run)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sign(fh: IO[str]) -> None:
    """Write this process's pid and command line into the lock file it has just locked."""
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "command": " ".join(sys.orig_argv)}))
    fh.flush()


def _holder(path: Path) -> str:
    """Who holds the writer lock at `path`, as its holder wrote it there. A holder that has
    only just taken the lock may not have written yet: the file is read again for a second."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            raw = json.loads(path.read_text())
            pid, command = int(raw["pid"]), " ".join(str(raw.get("command", "")).split())
            return f"pid {pid}" + (f": {command[:200]}" if command else "")
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return "pid unknown"
            time.sleep(0.05)


@contextmanager
def writer_lock(folder: str | Path) -> Iterator[None]:
    """One writer per run folder: hold `folder`'s writer lock for the `with` block, or raise
    ErdeError naming the live process that holds it (from the pid it wrote into the lock file).
    The system drops the lock when its process dies. The same process may enter it again
    (`erde reproduce` trains runs it already holds)."""
    folder = resolved(folder)
    if folder in _HELD:
        _HELD[folder] += 1
        try:
            yield
        finally:
            _HELD[folder] -= 1
        return
    path = folder.parent / ".locks" / f"{folder.name}.writer"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ErdeError(
                f"{folder} is being written by another live process ({_holder(path)}); "
                "wait for it to finish or stop it, or choose another folder"
            ) from None
        _sign(fh)
        _HELD[folder] = 1
        try:
            yield
        finally:
            del _HELD[folder]
            fh.truncate(0)  # no stale pid left for the next holder's first moment
            fcntl.flock(fh, fcntl.LOCK_UN)


__all__ = ["lock_path", "run_lock", "writer_lock"]
