"""The exit rule's policy names and thresholds with numpy only, so that the ONNX runtime (which
applies the rule `score < threshold` per exit) runs without PyTorch; `erde.evaluation.policy`
computes the scores and builds on these."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated

import numpy as np
from pydantic import StringConstraints

from erde.errors import ErdeError

# An exit policy's name, as the manifest and the config hold it: the torch-free runtime reads only
# the name (the score is traced into the exported graph), so it checks the spelling, never a
# registry. `erde.evaluation.policies` holds the registered policies.
POLICY_NAME = r"^[a-z][a-z0-9_-]{0,39}$"
PolicyName = Annotated[str, StringConstraints(strict=True, pattern=POLICY_NAME)]


def check_policy_name(name: object) -> None:
    if not isinstance(name, str) or re.fullmatch(POLICY_NAME, name) is None:
        raise ErdeError(
            f"exit policy name {name!r} is not allowed; use 1 to 40 lowercase letters, digits, "
            "'-' or '_', starting with a letter (e.g. 'top2-margin')"
        )


def threshold_array(threshold: float | Sequence[float] | np.ndarray, n_exits: int) -> np.ndarray:
    """Validated float32 thresholds for the E-1 exits that can decide (the last always answers).

    float32 matches the scores' precision, so a sweep, a per-threshold simulation and the runtime
    compare the very same numbers.
    """
    given = _real_numbers(threshold)
    values = given.astype(np.float64).flatten()
    if values.size == 1 and given.ndim == 0:
        values = np.repeat(values, n_exits - 1)
    elif values.size not in (n_exits - 1, n_exits):
        raise ErdeError(
            f"got {values.size} thresholds for a model with {n_exits} exits; give one number, "
            f"or one per exit ({n_exits - 1} or {n_exits}; the last exit always answers)."
        )
    values = values[: n_exits - 1]
    if np.isnan(values).any() or (values < 0).any():
        raise ErdeError(
            f"exit thresholds must be non-negative numbers; got {values.tolist()}. "
            "Use 0 for 'never exit early' and larger values to exit more often."
        )
    return values.astype(np.float32)


def _real_numbers(threshold: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """The thresholds as an array of real numbers; text ('0.5'), bools and complex numbers are
    refused with one line rather than numpy's TypeError or a silent cast."""
    try:
        given = np.asarray(threshold)
    except (TypeError, ValueError):  # ragged lists
        given = np.asarray(None)
    if given.dtype.kind not in "iuf":
        raise ErdeError(
            f"exit thresholds must be real numbers; got {threshold!r}. Give one number (0.5, "
            "not '0.5'), or a list of numbers, one per exit"
        )
    return given
