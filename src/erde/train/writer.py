"""Everything a training run writes into its folder, owned by one object on rank 0.

`check_run_dir` only reads (every rank of a multi-process run calls it); `RunWriter` then writes
the config, `train.log`, TensorBoard events, the per-epoch weights, metrics and state, and the
kept checkpoints. The loop never names a file.
"""

from __future__ import annotations

import logging
import shutil

from torch import nn

from erde.config.schema import Config, load_config, to_dict, to_yaml
from erde.errors import ErdeError
from erde.files import metrics_lines, temporaries, write_text
from erde.run import checkpoint as ckpt
from erde.run.layout import RunDir
from erde.run.model_info import ModelInfo

log = logging.getLogger("erde.train.engine")


def check_run_dir(run: RunDir, cfg: Config | None, *, resume: bool, overwrite: bool) -> Config:
    """Refuse to clobber a run; return the config the run will use (the saved one on resume)."""
    if resume:
        if not run.has_run():
            raise ErdeError(f"--resume: {run} holds no erde run to resume; drop --resume")
        saved = load_config(str(run.config))
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


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def tensorboard_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ErdeError(
            "train.tensorboard=true needs the tensorboard package: pip install 'erde[tensorboard]'"
        ) from None
    return SummaryWriter


class RunWriter:
    """Rank 0's files of one run. Use as a context manager: the log handler and TensorBoard
    writer are closed however the run ends."""

    def __init__(self, run: RunDir, cfg: Config) -> None:
        self.run, self.cfg = run, cfg
        self._summary_class = tensorboard_class() if cfg.train.tensorboard else None
        self._handler: logging.Handler | None = None
        self._tensorboard = None

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
        self._handler = logging.FileHandler(self.run.log)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(self._handler)
        log.setLevel(logging.INFO)
        if self._summary_class is not None:
            self._tensorboard = self._summary_class(str(self.run.tensorboard))
        return self

    def __exit__(self, *exc) -> None:
        if self._handler is not None:
            log.removeHandler(self._handler)
            self._handler.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def save_epoch(self, net: nn.Module, state: dict, history: list[dict], info: ModelInfo) -> None:
        """Weights first, then the state that says the epoch is done: a crash between them
        resumes the epoch again and overwrites the weights, never the reverse."""
        ckpt.save_weights(self.run.weights, net, info, self.run.sidecar)
        write_text(self.run.metrics, metrics_lines(history))
        ckpt.save_state(self.run.path, state)
        every = self.cfg.train.checkpoint_every
        if every and info.epoch % every == 0 and not info.finished:
            ckpt.save_weights(self.run.checkpoint(info.epoch), net, info)

    def log_epoch(self, row: dict) -> None:
        """One line a person can follow (every number is in metrics.jsonl too)."""
        if self._tensorboard is not None:
            for key, value in row.items():
                self._tensorboard.add_scalar(key, value, row["epoch"])
        epochs = self.cfg.train.epochs
        accuracy = " / ".join(
            f"{100 * row[k]:.2f}" for k in sorted(row, key=_exit_order) if k.startswith("val/acc/")
        )
        left = (epochs - row["epoch"]) * row["epoch_s"]
        log.info(
            "epoch %d of %d: train loss %.4f, val accuracy per exit (%%) %s, %.1f s, %.0f img/s%s",
            row["epoch"],
            epochs,
            row["train/loss"],
            accuracy,
            row["epoch_s"],
            row["images_per_s"],
            f", about {left / 60:.1f} min left" if left else "",
        )


def _exit_order(key: str) -> int:
    return int(key.rsplit("/", 1)[1]) if key.startswith("val/acc/") else -1
