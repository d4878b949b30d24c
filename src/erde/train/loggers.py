"""Where an epoch's metrics row goes: metrics.jsonl, TensorBoard, the log. One small protocol, so
a run's writer holds a list of them and another sink is one class more."""

from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path
from typing import Protocol

from erde.errors import ErdeError
from erde.files import write_failed, write_text
from erde.run.metrics import metrics_line

log = logging.getLogger("erde.train.engine")


class EpochLogger(Protocol):
    def log(self, row: dict) -> None: ...

    def close(self) -> None: ...


class MetricsFile:
    """metrics.jsonl: one row appended per epoch, so an epoch costs one line whatever the run's
    length (the file was rewritten whole every epoch)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def keep(self, epochs: int) -> None:
        """Resuming after `epochs` saved epochs: drop the rows (or the half line) written after
        the last saved state, whose epochs run again."""
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            lines = [line for line in fh if line.strip()]
        if len(lines) > epochs or (lines and not lines[-1].endswith("\n")):
            write_text(self.path, "".join(line.rstrip("\n") + "\n" for line in lines[:epochs]))

    def log(self, row: dict) -> None:
        line = metrics_line(row).encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # on resume, `keep` drops a half line a full disk left
            raise write_failed(self.path, exc) from exc

    def close(self) -> None:
        pass


def tensorboard_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ErdeError(
            "train.tensorboard=true needs the tensorboard package: pip install 'erde[tensorboard]'"
        ) from None
    return SummaryWriter


class TensorBoard:
    """Every number of the row as a scalar at its epoch (`train.tensorboard=true`)."""

    def __init__(self, folder: Path, summary_class: type) -> None:
        self._writer = summary_class(str(folder))

    def log(self, row: dict) -> None:
        for key, value in row.items():
            self._writer.add_scalar(key, value, row["epoch"])

    def close(self) -> None:
        self._writer.close()


class Console:
    """One line a person can follow (every number is in metrics.jsonl too)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self._seconds: list[float] = []

    def log(self, row: dict) -> None:
        accuracy = " / ".join(
            f"{100 * row[k]:.2f}" for k in sorted(row, key=_exit_order) if k.startswith("val/acc/")
        )
        # The median epoch so far: one epoch slowed by a busy neighbour does not swing it.
        self._seconds.append(row["epoch_s"])
        left = (self.epochs - row["epoch"]) * statistics.median(self._seconds)
        log.info(
            "epoch %d of %d: train loss %.4f, val accuracy per exit (%%) %s, %.1f s, %.0f img/s%s",
            row["epoch"],
            self.epochs,
            row["train/loss"],
            accuracy,
            row["epoch_s"],
            row["images_per_s"],
            f", about {left / 60:.1f} min left" if left else "",
        )

    def close(self) -> None:
        pass


def _exit_order(key: str) -> int:
    return int(key.rsplit("/", 1)[1]) if key.startswith("val/acc/") else -1
