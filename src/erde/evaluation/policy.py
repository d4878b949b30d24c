"""Exit policies: how confident each exit is, and which exit answers each image.

Every policy yields a *score* per image and exit where lower means more confident, so one rule
serves all of them: an image leaves at the first exit whose score is below that exit's threshold
theta, and the last exit always answers.

- ``entropy``: Shannon entropy (natural log) of the exit's softmax, in [0, log K]; with
  ``normalize=True`` it is divided by log K and lies in [0, 1].
- ``maxprob``: ``1 - max softmax probability``, in [0, 1 - 1/K]. "Exit when the top class has
  probability above p" is theta = ``maxprob_threshold(p)`` = 1 - p. ``normalize`` has no effect
  here because the score already lies in [0, 1].

Thresholds: theta = 0 never exits early (no score is negative), so every image reaches the last
exit. A theta above every possible score (e.g. > log K for raw entropy, > 1 for maxprob) is
allowed and means "always leave at the first exit". Negative or NaN thresholds are mistakes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from erde.errors import ErdeError

# The exit policies, each implemented in `exit_scores`. This module owns the names; the config
# schema, a layer below, repeats them as `evaluate.policy`'s allowed values, and
# tests/test_policy.py checks that the two agree.
POLICIES: tuple[str, ...] = ("entropy", "maxprob")


def check_logits(logits: torch.Tensor) -> None:
    """Reject arrays that are not N x E x K; they come from a cache a user can point at."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if hasattr(logits, "shape") else type(logits).__name__
        raise ErdeError(
            f"per-exit logits must be a tensor of shape (images, exits, classes); got {shape}. "
            "Re-create the logits cache with `erde evaluate`."
        )
    if logits.shape[1] < 1 or logits.shape[2] < 2:
        raise ErdeError(
            f"per-exit logits need at least 1 exit and 2 classes; got shape {tuple(logits.shape)}. "
            "Check the model's exits and number of classes."
        )


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ErdeError(f"unknown exit policy {policy!r}; choose one of {', '.join(POLICIES)}.")


def maxprob_threshold(p: float) -> float:
    """The theta that makes the maxprob policy exit when the top probability exceeds ``p``."""
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise ErdeError(f"a max-probability level must lie in [0, 1]; got {p}.")
    return 1.0 - p


def exit_scores(logits: torch.Tensor, policy: str, normalize: bool) -> torch.Tensor:
    """Scores over the last (class) dimension, with plain tensor ops only.

    This is the one formula: the simulator uses it through `confidence_scores`, and `erde
    export` traces it into every exit's ONNX piece, so a deployed model decides exactly as the
    evaluation predicted. Computed from log-softmax in float32 so half-precision inputs and
    logits of +/-1e4 give finite, accurate scores.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    if policy == "entropy":
        scores = -(logp.exp() * logp).sum(dim=-1)
        if normalize:
            scores = scores / math.log(logits.shape[-1])
    else:
        # Summing the other classes' probabilities keeps 1 - p_max accurate when p_max is within
        # float32 rounding of 1, where the subtraction would give 0.
        top = logp.argmax(dim=-1, keepdim=True)
        scores = logp.exp().scatter(-1, top, 0.0).sum(dim=-1)
    return scores.clamp_min(0.0)


def confidence_scores(
    logits: torch.Tensor, policy: str = "entropy", normalize: bool = False
) -> torch.Tensor:
    """Per-image, per-exit scores (N x E, float32, >= 0); lower means more confident."""
    check_logits(logits)
    check_policy(policy)
    scores = exit_scores(logits, policy, normalize)
    if not torch.isfinite(scores).all():
        raise ErdeError(
            "per-exit logits contain NaN or infinite values (the model diverged or the cache is "
            "corrupt); retrain with a lower learning rate or re-create the logits cache."
        )
    return scores


def exit_thresholds(
    threshold: float | Sequence[float] | torch.Tensor, n_exits: int
) -> torch.Tensor:
    """Validated float32 thresholds for the E-1 exits that can decide (the last always answers).

    float32 matches the scores' precision, so a sweep and a per-threshold simulation compare the
    very same numbers.
    """
    values = _real_numbers(threshold)
    if values.numel() == 1 and np.ndim(threshold) == 0:
        values = values.expand(n_exits - 1)
    elif values.numel() not in (n_exits - 1, n_exits):
        raise ErdeError(
            f"got {values.numel()} thresholds for a model with {n_exits} exits; give one number, "
            f"or one per exit ({n_exits - 1} or {n_exits}; the last exit always answers)."
        )
    values = values[: n_exits - 1]
    if torch.isnan(values).any() or (values < 0).any():
        raise ErdeError(
            f"exit thresholds must be non-negative numbers; got {values.tolist()}. "
            "Use 0 for 'never exit early' and larger values to exit more often."
        )
    return values.float()


def _real_numbers(threshold: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """The thresholds as float64, flattened; text ('0.5'), bools and complex numbers refused
    with one line rather than torch's TypeError or a silent cast."""
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.detach().cpu().tolist()
    try:
        kind = np.asarray(threshold).dtype.kind
    except (TypeError, ValueError):  # ragged lists
        kind = "O"
    if kind not in "iuf":
        raise ErdeError(
            f"exit thresholds must be real numbers; got {threshold!r}. Give one number (0.5, "
            "not '0.5'), or a list of numbers, one per exit"
        )
    return torch.as_tensor(np.asarray(threshold, dtype=np.float64)).flatten()


def exits_from_scores(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Index of the first exit whose score is below its threshold (the last exit if none)."""
    n, e = scores.shape
    below = torch.ones(n, e, dtype=torch.uint8)
    below[:, : e - 1] = scores[:, : e - 1] < thresholds
    return below.argmax(dim=1)  # argmax returns the first maximal index


def simulate(
    logits: torch.Tensor,
    threshold: float | Sequence[float] | torch.Tensor,
    policy: str = "entropy",
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit index and prediction per image, as a deployed early-exit model would produce them.

    ``threshold`` is one theta for every exit, or one per exit (E-1 values, or E with the last
    ignored).
    """
    scores = confidence_scores(logits, policy, normalize)
    exit_index = exits_from_scores(scores, exit_thresholds(threshold, logits.shape[1]))
    per_exit_pred = logits.argmax(dim=-1)
    prediction = per_exit_pred.gather(1, exit_index[:, None]).squeeze(1)
    return exit_index, prediction
