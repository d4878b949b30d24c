"""Advisory file locks, so that processes sharing a study folder never train the same run twice.

Shards of one study (several terminals, a SLURM array) run on one file system: the teacher is
trained by whichever process takes its lock first while the others wait, and a student whose lock
another process holds is skipped. Locks live in `.locks/` beside the runs (`fcntl.flock`: local
file systems and NFSv4), and the operating system drops them when their process dies, so a killed
process never leaves a run locked.

`writer_lock` is the other rule: one writer per run folder. `erde train` and `erde evaluate` hold
it while they write a run, and a second process is refused at once with the pid and command of
the first. It is a `flock` on the run folder itself (opened read-only), so it needs no file and no
writable parent: nothing is written beside the folders a command is given (except on NFS, which
locks only files open for writing: there it is `.locks/NAME.writer` beside the folder). The
holder is found in the kernel's table of locks (`/proc/locks`, Linux; elsewhere the message
says "pid unknown").
Both are keyed by the folder's resolved path (`os.path.realpath`): a folder reached through a
symbolic link, or spelled with `..`, has the one lock of the folder it names.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    another process holds it (then nothing is held). Where the lock cannot be created (a
    read-only folder, such as a shared teacher), nothing can be written either: no lock."""
    path = lock_path(run)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a")  # noqa: SIM115 (closed by the with block below)
    except PermissionError:  # a read-only folder (a teacher shared read-only): nothing can
        log.debug("%s: read-only, no lock needed", path.parent.parent)  # be written there
        yield True
        return
    with fh:
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


def _holder(locked: Path) -> str:
    """Who holds the flock on `locked`: its pid and command, from /proc."""
    st = os.stat(locked)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as fh:
            rows = [line.split() for line in fh]
        pid = next(int(r[4]) for r in rows if len(r) > 5 and r[1] == "FLOCK" and r[5] == device)
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, StopIteration, ValueError, UnicodeDecodeError):
        return "pid unknown"
    command = " ".join(command.split())
    return f"pid {pid}" + (f": {command[:200]}" if command else "")


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents (to lock it); the ones created, deepest first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


@contextmanager
def writer_lock(folder: str | Path) -> Iterator[None]:
    """One writer per run folder: hold `folder`'s writer lock for the `with` block, or raise
    ErdeError naming the live process that holds it. The system drops the lock when its process
    dies. The same process may enter it again (`erde reproduce` trains runs it already holds).
    A folder that does not exist is created to be locked, and removed again if the block leaves
    it empty (a refused `erde train` leaves nothing behind)."""
    folder = resolved(folder)
    if folder in _HELD:
        _HELD[folder] += 1
        try:
            yield
        finally:
            _HELD[folder] -= 1
        return
    created = _make_folder(folder)
    fd = None
    try:
        fd = _lock(folder)
        _HELD[folder] = 1
        try:
            yield
        finally:
            del _HELD[folder]
    finally:
        _remove_empty(created)  # while still locked: no other process is writing it
        if fd is not None:
            os.close(fd)  # which releases the lock


def _lock(folder: Path) -> int:
    """A descriptor holding the exclusive flock of `folder`, or ErdeError naming its holder."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        raise _busy(folder, folder) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    # NFS locks only files open for writing: there, a lock file beside the folder.
    path = folder.parent / ".locks" / f"{folder.name}.writer"
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        raise _busy(folder, path) from None


def _busy(folder: Path, locked: Path) -> ErdeError:
    return ErdeError(
        f"{folder} is being written by another live process ({_holder(locked)}); "
        "wait for it to finish or stop it, or choose another folder"
    )


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders `writer_lock` created that are still empty, deepest first."""
    for path in created:
        try:
            path.rmdir()
        except OSError:  # not empty: the run was written
            return


__all__ = ["lock_path", "run_lock", "writer_lock"]
