"""Where progress lines go: stdout, so stderr holds only the one-line error of a failed command."""

from __future__ import annotations

import logging
import os
import sys


def log_to_stdout() -> None:
    """Once per process, and only on rank 0 of a torchrun job."""
    logger = logging.getLogger("erde")
    if os.environ.get("RANK", "0") != "0" or any(h.name == "erde-stdout" for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.name = "erde-stdout"
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
