"""Mechanism diagnostics per exit on the test split: what ERDE claims to move.

ERDE trains a student to stay unsure where its teacher errs, so that those images do not leave
early. These numbers say whether it did: how calibrated each exit is (ECE), how well its exit
score tells its right answers from its wrong ones (AUROC), how unsure it is on the images the
teacher gets right versus wrong, and, at the val-calibrated threshold, how many early exits are
wrong and where the teacher-wrong images leave. Definitions: README, "Evaluation".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from erde.errors import ErdeError
from erde.evaluation.scores import ExitScores
from erde.run.report import Diagnostics, ExitDiagnostics

ECE_BINS = 15


@dataclass(frozen=True)
class ReferenceLogits:
    """The reference run's test logits (N x F x K) and labels, and its name for the report."""

    label: str
    logits: torch.Tensor
    labels: torch.Tensor


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Sum over equal-width bins of |bin| / N * |accuracy(bin) - mean confidence(bin)|.

    Bin b holds confidences in (b/bins, (b+1)/bins] (the first also holds 0), the usual
    convention (Guo et al., 2017). `confidence` is the max softmax probability of each image.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    gap = np.bincount(index, weights=correct - confidence, minlength=bins)
    return float(np.abs(gap).sum() / max(len(confidence), 1))


def correctness_auroc(scores: np.ndarray, correct: np.ndarray) -> float | None:
    """AUROC of "this answer is right" ranked by confidence (= minus the exit score).

    The probability that a random right answer has a lower score than a random wrong one, ties
    counted half (Mann-Whitney). None when every answer is right or every one is wrong: there is
    no pair to rank, and any number would be invented.
    """
    from scipy.stats import rankdata  # a second to import: only evaluation needs it

    correct = np.asarray(correct, dtype=bool)
    n_right = int(correct.sum())
    n_wrong = len(correct) - n_right
    if n_right == 0 or n_wrong == 0:
        return None
    ranks = rankdata(-np.asarray(scores, dtype=np.float64))  # average ranks for ties
    return float((ranks[correct].sum() - n_right * (n_right + 1) / 2) / (n_right * n_wrong))


def _mean(values: np.ndarray) -> float | None:
    """The mean, or None for an empty group (no image to average over)."""
    return float(np.mean(values, dtype=np.float64)) if values.size else None


def _teacher_exits(
    pairing: list[int] | None, n_exits: int, teacher: ReferenceLogits
) -> tuple[list[int], str]:
    """The reference exit that decides "teacher right" for each exit, and the note saying so."""
    n_teacher = teacher.logits.shape[1]
    if pairing is None:
        note = (
            f"the run was not distilled (no exit pairing): every exit is judged against the "
            f"final exit of the reference {teacher.label}"
        )
        return [n_teacher - 1] * n_exits, note
    if len(pairing) != n_exits or max(pairing) >= n_teacher:
        raise ErdeError(
            f"the run learned from teacher exits {[j + 1 for j in pairing]} but the reference "
            f"{teacher.label} has {n_teacher} exits; give the run's own teacher as --reference"
        )
    note = (
        f"exit i is judged against the exit of the reference {teacher.label} it was paired with "
        f"in training (teacher exits {', '.join(str(j + 1) for j in pairing)})"
    )
    return list(pairing), note


def _check_teacher(teacher: ReferenceLogits, labels: torch.Tensor, k: int) -> None:
    if teacher.logits.shape[2] != k or not torch.equal(teacher.labels, labels):
        raise ErdeError(
            f"the reference {teacher.label} was evaluated on other test images or classes than "
            "this run; give the teacher trained on the same data as --reference"
        )


def _exit_entry(
    i: int,
    scores: np.ndarray,
    correct: np.ndarray,
    confidence: np.ndarray,
    teacher_exit: int | None,
    teacher_right: np.ndarray | None,
    wrong_exits: np.ndarray | None,
) -> ExitDiagnostics:
    """Exit `i`'s entry; the teacher ones stay None without a reference run."""
    right = None if teacher_right is None else teacher_right[:, teacher_exit]
    return ExitDiagnostics(
        ece=expected_calibration_error(confidence[:, i], correct[:, i]),
        auroc=correctness_auroc(scores[:, i], correct[:, i]),
        teacher_exit=None if teacher_exit is None else teacher_exit + 1,  # as reports number
        mean_score_teacher_right=None if right is None else _mean(scores[right, i]),
        mean_score_teacher_wrong=None if right is None else _mean(scores[~right, i]),
        teacher_wrong_exit_share=None if wrong_exits is None else _mean(wrong_exits == i),
    )


def diagnose(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    threshold: float,
    policy: str = "entropy",
    normalize: bool = False,
    pairing: list[int] | None = None,
    teacher: ReferenceLogits | None = None,
) -> Diagnostics:
    """The diagnostics of one run's test logits (N x E x K) at the chosen `threshold`.

    `pairing`: the teacher exit each exit learned from (the run's model.json); `teacher`: the
    reference run's test outputs, without which the teacher entries are None.
    """
    test = ExitScores.of(logits, labels, policy, normalize)
    return diagnose_scores(test, threshold=threshold, pairing=pairing, teacher=teacher)


def diagnose_scores(
    test: ExitScores,
    *,
    threshold: float,
    pairing: list[int] | None = None,
    teacher: ReferenceLogits | None = None,
) -> Diagnostics:
    """``diagnose`` of a test split scored once, so the report needs no second scoring."""
    logits, labels = test.logits, test.labels
    n, e, k = logits.shape
    scores, correct = test.scores.numpy(), test.correct.numpy()
    confidence = torch.softmax(logits.double(), dim=-1).amax(dim=-1).numpy()
    exit_index, prediction = test.simulate(threshold)
    early = (exit_index < e - 1).numpy()
    exits: list[int | None] = [None] * e
    note = "n/a: no reference run given (--reference TEACHER)"
    teacher_right = wrong_exits = None
    if teacher is not None:
        _check_teacher(teacher, labels, k)
        paired, note = _teacher_exits(pairing, e, teacher)
        exits = list(paired)
        teacher_right = (teacher.logits.argmax(dim=-1) == labels[:, None]).numpy()  # N x F
        wrong_exits = exit_index.numpy()[~teacher_right[:, -1]]
    return Diagnostics(
        ece_bins=ECE_BINS,
        teacher_note=note,
        teacher_wrong_share=None
        if teacher_right is None
        else float(1 - teacher_right[:, -1].mean()),
        teacher_wrong_images=None if teacher_right is None else int((~teacher_right[:, -1]).sum()),
        early_exit_share=float(early.mean()) if n else 0.0,
        early_exit_error=_mean((prediction != labels).numpy()[early]),
        per_exit=[
            _exit_entry(i, scores, correct, confidence, exits[i], teacher_right, wrong_exits)
            for i in range(e)
        ],
    )
