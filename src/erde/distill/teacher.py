"""The teacher of a distillation run: a finished run, frozen, checked against the student's data."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from erde.errors import ErdeError
from erde.models.load import load_model
from erde.run.checkpoint import check_finished
from erde.run.model_info import DataInfo, ModelInfo


def check_teacher(run_dir: str | Path, data: DataInfo) -> tuple[nn.Module, ModelInfo]:
    """A finished run trained on the student's data: its model (CPU, eval mode) and sidecar.
    `erde reproduce` calls it before training any student, `Teacher` when distillation starts."""
    model, info = load_model(run_dir)
    check_finished(run_dir, info, "teacher run", "distilling from it")
    key = info.data.mismatch(data)
    if key is not None:
        raise ErdeError(
            f"teacher {run_dir} was trained on data with {key}={getattr(info.data, key)!r} "
            f"but the student's data has {key}={getattr(data, key)!r}; train both on "
            "the same data source"
        )
    return model, info


class Teacher:
    """A finished run, frozen: eval mode, no gradients, on the student's device and layout."""

    def __init__(
        self, run_dir: str | Path, data: DataInfo, device: torch.device, channels_last: bool
    ) -> None:
        model, info = check_teacher(run_dir, data)
        model = model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.info = info

    @property
    def exit_macs(self) -> list[int]:
        return self.info.exit_macs

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model(x)
