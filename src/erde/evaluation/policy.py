"""Exit policies: how confident each exit is, and which exit answers each image.

Every policy yields a *score* per image and exit where lower means more confident, so one rule
serves all of them: an image leaves at the first exit whose score is below that exit's threshold
theta, and the last exit always answers. The policies are registered by name
(`erde.evaluation.policies`: the built-ins below, and the user's own with `register_policy`).

- ``entropy``: Shannon entropy (natural log) of the exit's softmax, in [0, log K]; with
  ``normalize=True`` it is divided by log K and lies in [0, 1].
- ``maxprob``: ``1 - max softmax probability``, in [0, 1 - 1/K]. "Exit when the top class has
  probability above p" is theta = ``maxprob_threshold(p)`` = 1 - p. ``normalize`` has no effect
  here because the score already lies in [0, 1].
- ``margin``: ``1 - (p1 - p2)``, one minus the gap between the two largest probabilities, in
  [0, 1]. "Exit when the top class leads the runner-up by more than m" is theta = 1 - m.
  ``normalize`` has no effect.

Thresholds: theta = 0 never exits early (no score is negative: a plugin's negative scores count
as 0), so every image reaches the last exit. A theta above every possible score (e.g. > log K
for raw entropy, > 1 for maxprob) is allowed and means "always leave at the first exit".
Negative or NaN thresholds are mistakes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from erde.errors import ErdeError
from erde.evaluation.policies import get_policy
from erde.evaluation.rule import threshold_array


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


def maxprob_threshold(p: float) -> float:
    """The theta that makes the maxprob policy exit when the top probability exceeds ``p``."""
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise ErdeError(f"a max-probability level must lie in [0, 1]; got {p}.")
    return 1.0 - p


def exit_scores(logits: torch.Tensor, policy: str, normalize: bool) -> torch.Tensor:
    """The registered policy's scores over the last (class) dimension, with tensor ops only.

    This is the one formula: the simulator uses it through `confidence_scores`, and `erde
    export` traces it into every exit's ONNX piece, so a deployed model decides exactly as the
    evaluation predicted. The policy gets float32 logits, so half-precision inputs give the
    same scores; the built-ins work from log-softmax, finite and accurate at logits of +/-1e4.
    """
    registered = get_policy(policy)
    scores = registered.score(logits.float())
    if normalize and registered.normalizer is not None:
        scores = scores / registered.normalizer(logits.shape[-1])
    return scores.clamp_min(0.0)


def confidence_scores(
    logits: torch.Tensor, policy: str = "entropy", normalize: bool = False
) -> torch.Tensor:
    """Per-image, per-exit scores (N x E, float32, >= 0); lower means more confident."""
    check_logits(logits)
    scores = exit_scores(logits, policy, normalize)
    if not torch.isfinite(scores).all():
        if torch.isfinite(logits).all():
            raise ErdeError(
                f"the exit policy {policy!r} gave scores that are not finite for finite logits; "
                "fix the policy's function so that every score is a finite number"
            )
        raise ErdeError(
            "per-exit logits contain NaN or infinite values (the model diverged or the cache is "
            "corrupt); retrain with a lower learning rate or re-create the logits cache."
        )
    return scores


def exit_thresholds(
    threshold: float | Sequence[float] | torch.Tensor, n_exits: int
) -> torch.Tensor:
    """`rule.threshold_array` as a tensor: validated float32 thresholds for the exits that can
    decide."""
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.detach().cpu().numpy()
    return torch.from_numpy(threshold_array(threshold, n_exits))


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
