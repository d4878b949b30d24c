"""An ExecuTorch export run through ExecuTorch's own Python runtime (`executorch.runtime`): one
program call per image, the branch inside the program deciding where it stops.

Everything is checked before ExecuTorch sees it: the spec (`erde.deploy.executorch_files`), the
program's SHA-256, then the loaded method's inputs and outputs against the model the spec
describes, so a program of another model is refused even with a matching checksum. ExecuTorch's
runtime logs its refusals and CPU probing on stderr; loading runs with stderr silenced so that
a refusal is erde's one line.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from erde.deploy.arrays import model_input
from erde.deploy.executorch_export import check_executorch, quiet_import
from erde.deploy.executorch_files import FIX, PTE, interface, read_program, read_spec
from erde.deploy.runtime import EarlyExitRuntime, Prediction, _softmax
from erde.errors import ErdeError
from erde.evaluation.rule import threshold_array


@contextlib.contextmanager
def _silent_stderr() -> Iterator[None]:
    """Standard error silenced at both ends the runtime writes to: `sys.stderr` (where the
    Python bindings send its log) and file descriptor 2 (the C++ code's own)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_LOADED = []  # the programs this process has loaded: a thread pool in use must not be reset


def _set_threads(threads: int | None) -> None:
    """XNNPACK's thread pool, which is process-wide: resizing it under a loaded program can
    deadlock a later call (seen with executorch 1.5.1), so it is resized only before the first."""
    from executorch.extension.pybindings import portable_lib

    if threads is None or portable_lib._threadpool_get_thread_count() == threads:
        return
    if _LOADED:
        raise ErdeError(
            f"ExecuTorch's thread pool is shared by this process and already in use, so it "
            f"cannot be set to {threads} thread(s) now; give the thread count before loading "
            "any ExecuTorch program (a new process), or leave it as it is"
        )
    with _silent_stderr():  # it logs the reset
        portable_lib._unsafe_reset_threadpool(threads)


class ExecuTorchRuntime:
    """Classifies batches image by image with the export's `early_exit.pte`."""

    def __init__(self, export_dir: str | Path, *, threads: int | None = None) -> None:
        """`threads`: XNNPACK's thread pool size, for the whole process (None: ExecuTorch's
        default, one per core)."""
        check_executorch()
        quiet_import()
        from executorch.runtime import Runtime

        folder = Path(export_dir)
        spec = read_spec(folder)
        blob = read_program(folder, spec)
        path = folder / PTE
        _set_threads(threads)
        try:
            with _silent_stderr():
                # the method lives inside the program: both are kept, or calls crash
                self._program = Runtime.get().load_program(blob)
                meta = self._program.metadata("forward")
                self._method = self._program.load_method("forward")
        except RuntimeError as exc:
            raise ErdeError(f"{path} is a program ExecuTorch cannot load ({exc}); {FIX}") from None
        _LOADED.append(path)
        found = (
            [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())],
            [list(meta.output_tensor_meta(i).sizes()) for i in range(meta.num_outputs())],
        )
        inputs, outputs = interface(spec.info)
        if found != (list(inputs.values()), list(outputs.values())):
            raise ErdeError(
                f"{path} takes {found[0]} and gives {found[1]}, not the {inputs} and {outputs} "
                f"of the model in {folder / 'executorch.json'} (the program of another model); "
                f"{FIX}"
            )
        self.info, self.deployment = spec.info, spec.deployment
        self.weights_sha256 = spec.weights_sha256
        self.xnnpack = spec.xnnpack
        self.exporter = spec.exporter

    @property
    def classes(self) -> list[str]:
        return self.info.data.classes

    @property
    def in_channels(self) -> int:
        return self.info.data.in_channels

    @property
    def input_size(self) -> int:
        return self.info.data.input_size

    def call(self, image: np.ndarray, cutoffs: np.ndarray) -> tuple[np.ndarray, int]:
        """One image (1 x C x H x W, normalised float32) and float32 thresholds: logits, exit."""
        import torch

        logits, exit_at = self._method.execute([torch.from_numpy(image), torch.from_numpy(cutoffs)])
        return logits.numpy(), int(exit_at[0])

    def predict(
        self,
        x: np.ndarray,
        threshold: float | Sequence[float] | None = None,
        form: str = "auto",
    ) -> Prediction:
        """Class, probabilities and exit (1-based) per image, as `EarlyExitRuntime.predict`
        takes and gives them; `threshold` overrides the export's. The program is the single
        form only (one image per call), so `form` "split" is refused."""
        if form not in ("auto", "single"):
            raise ErdeError(
                f"an ExecuTorch export runs one image per call (form 'single' or 'auto'), not "
                f"form {form!r}; use an ONNX export (`erde export` without --format) to split "
                "batches"
            )
        x = model_input(x, self.info)
        rule = self.deployment.threshold if threshold is None else threshold
        cutoffs = threshold_array(rule, self.info.num_exits)
        k = len(self.classes)
        runs = [self.call(np.ascontiguousarray(x[j : j + 1]), cutoffs) for j in range(len(x))]
        logits = np.concatenate([r[0] for r in runs]) if runs else np.zeros((0, k), np.float32)
        exits = np.array([r[1] for r in runs], np.int64)
        work = np.bincount(exits - 1, minlength=self.info.num_exits)[::-1].cumsum()[::-1]
        return Prediction(
            labels=logits.argmax(axis=1),
            probabilities=_softmax(logits),
            exits=exits,
            logits=logits,
            images_per_piece=work.tolist(),
        )

    # `erde infer`'s files -> rows, exactly as for an ONNX export: it needs only `predict`,
    # `info`, `classes`, `in_channels` and `input_size`, which this class has too.
    classify_files = EarlyExitRuntime.classify_files
