"""An ExecuTorch export in `erde bench`'s table: the `.pte` timed beside the ONNX export of the
same weights, at the same thresholds and on the same batches (one program call per image)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from erde.deploy.executorch_runtime import ExecuTorchRuntime
from erde.deploy.manifest import Manifest
from erde.errors import ErdeError

Runner = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]


def executorch_runners(
    export_dir: Path, manifest: Manifest, thresholds: list[float], threads: int | None
) -> list[tuple[str, float, Runner]]:
    """(row name, threshold, run) per threshold; refused for a program of other weights, whose
    rows would compare two models."""
    runtime = ExecuTorchRuntime(export_dir, threads=threads)
    if runtime.weights_sha256 != manifest.weights_sha256:
        raise ErdeError(
            f"--executorch {export_dir} was exported from other weights than the ONNX export "
            f"timed (weights SHA-256 differs); export the same run with `erde export RUN --out "
            f"{export_dir} --format executorch`"
        )

    def runner(threshold: float) -> Runner:
        def run(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            pred = runtime.predict(x, threshold)
            return pred.labels, pred.exits

        return run

    name = f"student {manifest.info.name}, ExecuTorch early exit"
    return [(name, t, runner(t)) for t in thresholds]
