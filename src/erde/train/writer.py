"""Everything a training run writes into its folder, owned by one object on rank 0.

`check_run_dir` only reads (every rank of a multi-process run calls it); `RunWriter` then writes
the config and `train.log`, and hands each epoch to its `Checkpointer` and loggers
(`erde.train.loggers`). The loop never names a file.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from pathlib import Path

from torch import nn

from erde.config.schema import Config, load_config, to_dict, to_yaml
from erde.errors import ErdeError
from erde.files import temporaries, write_failed, write_text
from erde.models.plugins import check_trusted
from erde.run.layout import RunDir
from erde.run.model_info import ModelInfo
from erde.train.checkpointer import Checkpointer
from erde.train.loggers import (
    Console,
    EpochLogger,
    MetricsFile,
    TensorBoard,
    log,
    tensorboard_class,
)


class RunLog(logging.FileHandler):
    """`train.log`: a line the disk refuses stops the run with erde's one-line message, where
    logging would print a traceback on stderr for every line and train on."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            stream, self.stream = self.stream, None  # its buffer would fail again on close
            with contextlib.suppress(OSError):
                stream.close()
            raise write_failed(Path(self.baseFilename), exc) from exc
        super().handleError(record)


def check_run_dir(run: RunDir, cfg: Config | None, *, resume: bool, overwrite: bool) -> Config:
    """Refuse to clobber a run; return the config the run will use (the saved one on resume)."""
    if resume:
        if not run.has_run():
            raise ErdeError(f"--resume: {run} holds no erde run to resume; drop --resume")
        saved = load_config(str(run.config), recorded=True)
        if saved.model.module:  # the run's file names it, not the user: see erde.config.plugins
            check_trusted(saved.model.module, str(run.config))
        if cfg is not None and to_dict(cfg) != to_dict(saved):
            ours, theirs = _flat(to_dict(cfg)), _flat(to_dict(saved))
            keys = sorted(k for k in ours if ours[k] != theirs.get(k))
            raise ErdeError(
                f"--resume: the config differs from the one {run} was started with "
                f"(keys: {', '.join(keys)}); resume without a config, or start a new run"
            )
        return saved
    if cfg is None:
        raise ErdeError("give a config (preset name or YAML file) to start a run")
    if run.has_run():
        _check_replaceable(run, cfg, overwrite)
    if run.has_run() and not overwrite:
        finished = run.sidecar.is_file() and ModelInfo.read(run.sidecar).finished
        state = "a finished run" if finished else "an unfinished run (continue it with --resume)"
        raise ErdeError(
            f"{run} already holds {state}; pass --overwrite to replace it or choose another --out"
        )
    leftovers = set(temporaries(run.path))  # of a run killed while writing its config
    if run.path.exists() and set(run.path.iterdir()) - leftovers and not run.has_run():
        raise ErdeError(
            f"{run} is not empty and is not an erde run folder; choose a new or "
            "empty folder for --out"
        )
    return cfg


def _check_replaceable(run: RunDir, cfg: Config, overwrite: bool) -> None:
    """A run folder that holds other files, or the teacher, is not erde's to delete."""
    foreign = run.foreign_entries()
    if foreign:
        shown = ", ".join(foreign[:4]) + (
            f" and {len(foreign) - 4} more" if len(foreign) > 4 else ""
        )
        raise ErdeError(
            f"{run} holds a run and files erde did not write ({shown}), which "
            "--overwrite would delete; move them away or choose another --out"
        )
    teacher = cfg.distill.teacher
    inside = teacher and run.path.resolve() in (
        Path(teacher).resolve(),
        *Path(teacher).resolve().parents,
    )
    if overwrite and inside:
        raise ErdeError(
            f"--out {run} holds distill.teacher={teacher}, which --overwrite would delete; "
            "choose another --out"
        )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


class RunWriter:
    """Rank 0's files of one run: the folder, `train.log`, a `Checkpointer` and the epoch loggers.
    Use as a context manager: the log handler and the loggers are closed however the run ends."""

    def __init__(self, run: RunDir, cfg: Config) -> None:
        self.run, self.cfg = run, cfg
        self._summary_class = tensorboard_class() if cfg.train.tensorboard else None
        self._handler: logging.Handler | None = None
        self.checkpointer = Checkpointer(run, cfg.train.checkpoint_every)
        self.metrics = MetricsFile(run.metrics)
        self.loggers: list[EpochLogger] = []

    def start(self, *, resume: bool) -> None:
        """A fresh folder holding the resolved config (a checked, replaceable run is removed),
        or, on resume, the same folder without the half-written files of a killed write."""
        if not resume:
            if self.run.has_run():
                shutil.rmtree(self.run.path)
            self._remove_temporaries()
            self.run.path.mkdir(parents=True, exist_ok=True)
            write_text(self.run.config, to_yaml(self.cfg))
        else:
            self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        """Each is as large as its checkpoint, and none will ever be completed."""
        for folder in (self.run.path, self.run.checkpoints):
            for tmp in temporaries(folder):
                tmp.unlink(missing_ok=True)

    def __enter__(self) -> RunWriter:
        self._handler = RunLog(self.run.log)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(self._handler)
        log.setLevel(logging.INFO)
        self.loggers = [self.metrics, Console(self.cfg.train.epochs)]
        if self._summary_class is not None:
            self.loggers.append(TensorBoard(self.run.tensorboard, self._summary_class))
        return self

    def __exit__(self, *exc) -> None:
        if self._handler is not None:
            log.removeHandler(self._handler)
            self._handler.close()
        for logger in self.loggers:
            logger.close()

    def save_epoch(self, net: nn.Module, state: dict, row: dict, info: ModelInfo) -> None:
        """The weights, the row, then the state that says the epoch is done (see
        `erde.train.checkpointer`); on resume `MetricsFile.keep` drops a row saved without it."""
        self.checkpointer.save_weights(net, info)
        for logger in self.loggers:
            logger.log(row)
        self.checkpointer.save_state(state)
