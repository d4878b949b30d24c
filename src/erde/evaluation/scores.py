"""One split's exit scores, computed once for everything an evaluation states about it.

Scoring is a log-softmax over every logit (gigabytes at ImageNet scale), so `erde evaluate`
scores each split once into an `ExitScores` and every sweep, calibration, diagnostic and summary
number reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from erde.errors import ErdeError
from erde.evaluation.policy import (
    check_logits,
    confidence_scores,
    exit_thresholds,
    exits_from_scores,
)

ScoreFunction = Callable[[torch.Tensor, str, bool], torch.Tensor]
"""(logits N x E x K, policy, normalize) -> scores N x E: `confidence_scores` or a wrapper."""


def check_labels(labels: torch.Tensor | np.ndarray, n: int, k: int) -> torch.Tensor:
    """Labels as int64 N, each a valid class; a mismatched cache is a user-visible mistake."""
    labels = torch.as_tensor(labels)
    if labels.shape != (n,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ErdeError(
            f"labels must be {n} integer class indices (one per image in the logits); got "
            f"{labels.dtype} of shape {tuple(labels.shape)}. Re-create the logits cache."
        )
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ErdeError(
            f"labels must lie in [0, {k - 1}] for {k}-class logits; got [{int(labels.min())}, "
            f"{int(labels.max())}]. Check that the model and the data have the same classes."
        )
    return labels.long()


@dataclass(frozen=True)
class ExitScores:
    """A split's logits and labels with, per image and exit, its score, prediction and whether
    that prediction is right."""

    logits: torch.Tensor  # N x E x K
    labels: torch.Tensor  # N, int64
    scores: torch.Tensor  # N x E float32, >= 0; lower means more confident
    predictions: torch.Tensor  # N x E, the argmax class of each exit
    correct: torch.Tensor  # N x E bool

    @classmethod
    def of(
        cls,
        logits: torch.Tensor,
        labels: torch.Tensor | np.ndarray,
        policy: str = "entropy",
        normalize: bool = False,
        score: ScoreFunction = confidence_scores,
    ) -> ExitScores:
        """Validate a split and score it with `score` (the exit policy's scores) once."""
        check_logits(logits)
        n, _, k = logits.shape
        labels = check_labels(labels, n, k)
        scores = score(logits, policy, normalize)
        predictions = logits.argmax(dim=-1)
        return cls(logits, labels, scores, predictions, predictions == labels[:, None])

    @property
    def n_exits(self) -> int:
        return self.scores.shape[1]

    def simulate(
        self, threshold: float | Sequence[float] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exit index and prediction per image at `threshold`, as `policy.simulate` gives them."""
        exit_index = exits_from_scores(self.scores, exit_thresholds(threshold, self.n_exits))
        return exit_index, self.predictions.gather(1, exit_index[:, None]).squeeze(1)
