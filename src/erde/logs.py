"""Where progress lines go: stdout, so stderr holds only the one-line error of a failed command."""

from __future__ import annotations

import logging
import os
import sys
import time

# Bookkeeping that belongs in a run's train.log, not on the terminal (below WARNING).
LOG_ONLY = "erde.train.engine.cache"


def _for_the_terminal(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.name.startswith(LOG_ONLY)


def log_to_stdout() -> None:
    """Once per process, and only on rank 0 of a torchrun job."""
    logger = logging.getLogger("erde")
    if os.environ.get("RANK", "0") != "0" or any(h.name == "erde-stdout" for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.name = "erde-stdout"
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_for_the_terminal)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class Heartbeat:
    """Says when a plain progress line is due: without a terminal there is no bar, and a long
    epoch would otherwise print nothing until it ends."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = every_s
        self._last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return False
        self._last = now
        return True
