"""Every file name of a run folder, an evaluation folder and a comparison folder, in one place.

Code asks these objects for paths (`RunDir(path).weights`) instead of spelling file names, so a
layout change is one edit and a reader finds the whole layout here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from erde.files import temporaries


@dataclass(frozen=True)
class ReportDir:
    """What `erde evaluate` writes (by default `RUN/eval/`)."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def report_json(self) -> Path:
        return self.path / "report.json"

    @property
    def report_md(self) -> Path:
        return self.path / "report.md"

    @property
    def curve_csv(self) -> Path:
        """The test split's threshold sweep."""
        return self.path / "curve.csv"

    @property
    def curve_val_csv(self) -> Path:
        return self.path / "curve_val.csv"

    @property
    def tradeoff_png(self) -> Path:
        return self.path / "tradeoff.png"

    @property
    def exits_png(self) -> Path:
        return self.path / "exits.png"

    @property
    def diagnostics_png(self) -> Path:
        """Per exit: exit score on teacher-right and -wrong images, and where images exit."""
        return self.path / "diagnostics.png"


@dataclass(frozen=True)
class ComparisonDir:
    """What `erde compare` and `erde reproduce` write beside (or above) the runs they compare."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def comparison_md(self) -> Path:
        return self.path / "comparison.md"

    @property
    def comparison_json(self) -> Path:
        return self.path / "comparison.json"

    @property
    def comparison_png(self) -> Path:
        return self.path / "comparison.png"

    @property
    def reproduce_yaml(self) -> Path:
        """The resolved protocol config `erde reproduce` ran."""
        return self.path / "reproduce.yaml"


@dataclass(frozen=True)
class RunDir:
    """One run of `erde train`: config, weights and sidecar, training state, logs, caches."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        """The resolved config the run was started with (YAML)."""
        return self.path / "config.yaml"

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def sidecar(self) -> Path:
        """model.json: how to rebuild the model and what data it expects (`ModelInfo`)."""
        return self.path / "model.json"

    @property
    def state(self) -> Path:
        """Optimiser, scheduler, scaler, epoch and random streams for `--resume`."""
        return self.path / "state.pt"

    @property
    def metrics(self) -> Path:
        """One JSON line per finished epoch."""
        return self.path / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        """Copies kept every `train.checkpoint_every` epochs."""
        return self.path / "checkpoints"

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch{epoch:04d}.safetensors"

    @property
    def logits(self) -> Path:
        """Per-exit logits on the val and test splits, tied to the weights' SHA-256."""
        return self.path / "logits.safetensors"

    @property
    def teacher_cache(self) -> Path:
        """A teacher's outputs on students' training batches (`erde.distill.teacher_cache`)."""
        return self.path / "teacher-cache"

    @property
    def eval(self) -> ReportDir:
        """The report of the default criterion, whose threshold `erde export` deploys."""
        return ReportDir(self.path / "eval")

    def eval_for(
        self,
        *,
        policy: str = "entropy",
        normalize: bool = False,
        max_drop: float = 0.0,
        budget: float | None = None,
    ) -> ReportDir:
        """`eval` for the default criterion, `eval-CRITERION` for another (`eval-budget0.5`,
        `eval-maxprob-drop0.5`): evaluating with another criterion never silently replaces
        the threshold an earlier evaluation chose for export."""
        parts = [policy] if policy != "entropy" else []
        parts += ["normalized"] if normalize else []
        parts += [f"drop{max_drop:g}"] if max_drop else []
        parts += [f"budget{budget:g}"] if budget is not None else []
        return ReportDir(self.path / "-".join(["eval", *parts]))

    def has_run(self) -> bool:
        """A run was started here (it may be unfinished)."""
        return self.config.is_file()

    def foreign_entries(self) -> list[str]:
        """What in the folder erde does not write into a run: a folder holding any is never
        removed (`--overwrite` refuses), so erde deletes only what it wrote."""
        own = {
            p.name
            for p in (self.config, self.weights, self.sidecar, self.state, self.metrics, self.log)
        }
        own |= {p.name for p in (self.tensorboard, self.checkpoints, self.logits)}
        own |= {self.teacher_cache.name} | {p.name for p in temporaries(self.path)}
        return sorted(
            entry.name
            for entry in self.path.iterdir()
            if entry.name not in own and not _is_report_folder(entry)
        )


def _is_report_folder(entry: Path) -> bool:
    """RUN/eval or RUN/eval-CRITERION (`RunDir.eval_for`), as `erde evaluate` writes it."""
    named = entry.name == "eval" or entry.name.startswith("eval-")
    return named and entry.is_dir() and not entry.is_symlink()
