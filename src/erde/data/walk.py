"""Directory walks that end: every real folder is entered once, so a symlink loop (or two)
neither repeats images nor hangs, and special files (pipes, devices, sockets) are refused by
their type, never opened (opening a pipe for reading waits for a writer forever)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from erde.errors import ErdeError


def files_under(folder: str | Path, extensions: tuple[str, ...]) -> list[str]:
    """The files below `folder` (symlinks followed) whose names end in one of `extensions`
    (any case), sorted; a folder reached twice, through a link loop or two links to one
    folder, is walked once. ErdeError for a matching name that is not a regular file."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    pending = [str(folder)]
    while pending:
        current = pending.pop()
        info = os.stat(current)
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(current) as entries:
            for entry in sorted(entries, key=lambda e: e.name, reverse=True):
                try:
                    mode = os.stat(entry.path).st_mode
                except OSError:  # a dangling link: nothing to read
                    continue
                if stat.S_ISDIR(mode):
                    pending.append(entry.path)
                elif entry.name.lower().endswith(extensions):
                    if not stat.S_ISREG(mode):
                        raise ErdeError(
                            f"{entry.path} is not a regular file (a pipe, device or socket); "
                            "remove it from the data folder"
                        )
                    found.append(entry.path)
    return sorted(found)


__all__ = ["files_under"]
