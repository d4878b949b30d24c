"""The teacher of a distillation run: a finished run, frozen, checked against the student's data."""

from __future__ import annotations

from pathlib import Path

import torch

from erde.data.pixels import Renormalize
from erde.errors import ErdeError
from erde.models.load import RunModel, load_run_model
from erde.run.checkpoint import check_finished
from erde.run.model_info import DataInfo


def check_teacher(run_dir: str | Path, data: DataInfo) -> RunModel:
    """A finished run trained on the student's data: its model (CPU, eval mode) and sidecar.
    `erde reproduce` calls it before training any student, `Teacher` when distillation starts."""
    loaded = load_run_model(run_dir)
    info = loaded.info
    check_finished(run_dir, info, "teacher run", "distilling from it")
    key = info.data.mismatch(data)
    if key is not None:
        raise ErdeError(
            f"teacher {run_dir} was trained on data with {key}={getattr(info.data, key)!r} "
            f"but the student's data has {key}={getattr(data, key)!r}; train both on "
            "the same data source"
        )
    return loaded


class Teacher:
    """A finished run, frozen: eval mode, no gradients, on the student's device and layout.

    It reads the student's batches renormalised with its own statistics (its model.json): a
    student may normalise with others (`data.mean`, `data.std`), but the teacher's weights only
    make sense of the inputs it was trained on."""

    def __init__(
        self, run_dir: str | Path, data: DataInfo, device: torch.device, channels_last: bool
    ) -> None:
        model, info, digest = check_teacher(run_dir, data)
        model = model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.info = info
        # What the student's cache and training state are tied to: a replaced teacher is seen.
        self.weights_sha256 = digest  # of the bytes the model was loaded from
        own = (info.data.mean, info.data.std)
        self.inputs = Renormalize((data.mean, data.std), own, device)

    @property
    def exit_macs(self) -> list[int]:
        return self.info.exit_macs

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model(self.inputs(x))
