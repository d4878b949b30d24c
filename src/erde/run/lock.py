"""Advisory file locks, so that processes sharing a study folder never train the same run twice.

Shards of one study (several terminals, a SLURM array) run on one file system: the teacher is
trained by whichever process takes its lock first while the others wait, and a student whose lock
another process holds is skipped. Locks live in `.locks/` beside the runs (`fcntl.flock`: local
file systems and NFSv4), and the operating system drops them when their process dies, so a killed
process never leaves a run locked.

`writer_lock` is the other rule: one writer per run folder. `erde train` and `erde evaluate` hold
it while they write a run, and a second process is refused at once with the pid and command of
the first (a POSIX record lock, whose holder the system can name; the lock file never changes).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from erde.errors import ErdeError

log = logging.getLogger("erde.study.reproduce")
_HELD: dict[Path, int] = {}  # writer locks this process holds: how often it entered each


def lock_path(run: Path) -> Path:
    """The lock file of a run folder (or of any folder, such as a teacher cache)."""
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


def _holder(fd: int) -> str:
    """The process holding the POSIX lock on `fd`'s file: its pid and, where /proc shows it,
    its command line (nothing is written into the lock file, which never changes)."""
    layout = "hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid
    probe = struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    pid = struct.unpack(layout, fcntl.fcntl(fd, fcntl.F_GETLK, probe))[4]
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, UnicodeDecodeError):
        command = ""
    return f"pid {pid}" + (f": {command.strip()[:200]}" if command.strip() else "")


@contextmanager
def writer_lock(folder: str | Path) -> Iterator[None]:
    """One writer per run folder: hold `folder`'s writer lock for the `with` block, or raise
    ErdeError naming the live process that holds it. A POSIX record lock, so the other process
    can be named, and dropped by the system when its process dies. The same process may enter
    it again (`erde reproduce` trains runs it already holds)."""
    folder = Path(folder).absolute()
    if folder in _HELD:
        _HELD[folder] += 1
        try:
            yield
        finally:
            _HELD[folder] -= 1
        return
    path = folder.parent / ".locks" / f"{folder.name}.writer"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise ErdeError(
                f"{folder} is being written by another live process ({_holder(fh.fileno())}); "
                "wait for it to finish or stop it, or choose another folder"
            ) from None
        _HELD[folder] = 1
        try:
            yield
        finally:
            del _HELD[folder]
            fcntl.lockf(fh, fcntl.LOCK_UN)


__all__ = ["lock_path", "run_lock", "writer_lock"]
