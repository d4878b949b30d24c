"""Mechanism diagnostics: ECE and AUROC against independent computations, and the teacher-right /
teacher-wrong numbers on a case small enough to check by hand."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from erde.errors import ErdeError
from erde.evaluation.diagnostics import (
    ReferenceLogits,
    correctness_auroc,
    diagnose,
    expected_calibration_error,
)


def ece_by_loop(confidence, correct, bins=15) -> float:
    """The textbook definition, one bin and one image at a time: bin b holds (b/15, (b+1)/15]."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for b in range(bins):
        members = [
            (c, ok)
            for c, ok in zip(confidence, correct, strict=True)
            if edges[b] < c <= edges[b + 1] or (b == 0 and c == 0.0)
        ]
        if members:
            accuracy = sum(ok for _, ok in members) / len(members)
            mean_confidence = sum(c for c, _ in members) / len(members)
            total += len(members) / len(confidence) * abs(accuracy - mean_confidence)
    return total


@pytest.mark.parametrize("seed", range(6))
def test_ece_matches_a_plain_loop_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    k = int(rng.integers(2, 12))
    confidence = rng.uniform(1 / k, 1.0, n)
    correct = rng.random(n) < confidence  # roughly calibrated, never exactly
    assert expected_calibration_error(confidence, correct) == pytest.approx(
        ece_by_loop(confidence.tolist(), correct.tolist()), abs=1e-12
    )


def test_ece_edge_cases():
    edges = np.linspace(0.0, 1.0, 16)
    on_edges = np.concatenate([edges, edges[1:]])  # every bin boundary, twice
    correct = np.arange(len(on_edges)) % 3 == 0
    assert expected_calibration_error(on_edges, correct) == pytest.approx(
        ece_by_loop(on_edges.tolist(), correct.tolist()), abs=1e-12
    )
    assert expected_calibration_error(np.ones(5), np.ones(5, bool)) == 0.0  # sure and right
    assert expected_calibration_error(np.ones(5), np.zeros(5, bool)) == 1.0  # sure and wrong
    half = expected_calibration_error(np.full(4, 0.5), np.array([1, 0, 1, 0], bool))
    assert half == pytest.approx(0.0)  # 50 % sure, right half the time


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 500))
    scores = rng.exponential(1.0, n)
    if seed % 2:
        scores = np.round(scores, 1)  # many ties, counted half by both
    correct = rng.random(n) < np.exp(-scores)  # surer answers are right more often
    correct[:2] = [True, False]  # both classes present
    expected = roc_auc_score(correct, -scores)  # higher confidence = predicted right
    assert correctness_auroc(scores, correct) == pytest.approx(expected, abs=1e-12)


def test_auroc_sign_and_undefined_cases():
    scores = np.array([0.1, 0.2, 0.8, 0.9])
    assert correctness_auroc(scores, np.array([1, 1, 0, 0], bool)) == 1.0  # sure ones are right
    assert correctness_auroc(scores, np.array([0, 0, 1, 1], bool)) == 0.0  # sure ones are wrong
    assert correctness_auroc(np.ones(4), np.array([1, 0, 1, 0], bool)) == 0.5  # all tied
    # No right or no wrong answer: nothing to rank, so no number (not 0.5, not NaN).
    assert correctness_auroc(scores, np.ones(4, bool)) is None
    assert correctness_auroc(scores, np.zeros(4, bool)) is None


def logits_of(probabilities) -> torch.Tensor:
    return torch.tensor(probabilities, dtype=torch.float64).log().float()


# 4 test images, 2 classes, labels 0 0 1 0; with the maxprob policy the exit score is 1 - max p.
LABELS = torch.tensor([0, 0, 1, 0])
STUDENT = logits_of(
    [
        [[0.9, 0.1], [0.95, 0.05]],  # image 0: scores 0.1, 0.05; right, right
        [[0.6, 0.4], [0.6, 0.4]],  # image 1: scores 0.4, 0.4; right, right
        [[0.7, 0.3], [0.35, 0.65]],  # image 2: scores 0.3, 0.35; wrong, right
        [[0.2, 0.8], [0.85, 0.15]],  # image 3: scores 0.2, 0.15; wrong, right
    ]
)
# Teacher exit 1 right on images 0 and 2, teacher exit 2 (final) right on images 0 and 1.
TEACHER = ReferenceLogits(
    "teacher",
    logits_of(
        [[[0.9, 0.1]] * 2, [[0.2, 0.8], [0.8, 0.2]], [[0.1, 0.9], [0.9, 0.1]], [[0.3, 0.7]] * 2]
    ),
    LABELS,
)


def test_teacher_right_and_wrong_scores_on_a_hand_made_case():
    d = diagnose(STUDENT, LABELS, threshold=0.25, policy="maxprob", pairing=[0, 1], teacher=TEACHER)
    first, last = d.per_exit
    assert (first.teacher_exit, last.teacher_exit) == (1, 2)  # numbered from 1, as reports
    assert first.mean_score_teacher_right == pytest.approx((0.1 + 0.3) / 2)  # images 0, 2
    assert first.mean_score_teacher_wrong == pytest.approx((0.4 + 0.2) / 2)  # images 1, 3
    assert last.mean_score_teacher_right == pytest.approx((0.05 + 0.4) / 2)  # images 0, 1
    assert last.mean_score_teacher_wrong == pytest.approx((0.35 + 0.15) / 2)  # images 2, 3
    # At threshold 0.25 images 0 and 3 leave at exit 1; image 3 is wrong there.
    assert d.early_exit_share == 0.5 and d.early_exit_error == 0.5
    # The teacher's final exit is wrong on images 2 and 3: image 3 leaves early, image 2 late.
    assert d.teacher_wrong_share == 0.5
    assert [x.teacher_wrong_exit_share for x in d.per_exit] == [0.5, 0.5]
    assert "paired with in training (teacher exits 1, 2)" in d.teacher_note


def test_first_exit_auroc_and_ece_by_hand():
    d = diagnose(STUDENT, LABELS, threshold=0.25, policy="maxprob")
    # Exit 1: right answers have scores 0.1, 0.4 and wrong ones 0.3, 0.2: of the 4 pairs
    # (right, wrong) the right one is surer in 2 (0.1 < 0.3, 0.1 < 0.2).
    assert d.per_exit[0].auroc == pytest.approx(0.5)
    assert d.per_exit[1].auroc is None  # exit 2 is right on every image
    confidence = [0.9, 0.6, 0.7, 0.8]
    assert d.per_exit[0].ece == pytest.approx(ece_by_loop(confidence, [1, 1, 0, 0]), abs=1e-6)


def test_without_a_pairing_every_exit_is_judged_by_the_teachers_final_exit():
    d = diagnose(STUDENT, LABELS, threshold=0.25, policy="maxprob", teacher=TEACHER)
    assert [x.teacher_exit for x in d.per_exit] == [2, 2]  # the teacher's final exit
    assert d.per_exit[0].mean_score_teacher_right == pytest.approx((0.1 + 0.4) / 2)  # images 0, 1
    assert d.per_exit[0].mean_score_teacher_wrong == pytest.approx((0.3 + 0.2) / 2)  # images 2, 3
    assert "not distilled" in d.teacher_note


def test_without_a_reference_the_teacher_entries_say_why():
    d = diagnose(STUDENT, LABELS, threshold=0.0, policy="maxprob")
    assert "no reference run" in d.teacher_note and d.teacher_wrong_share is None
    for x in d.per_exit:
        assert x.teacher_exit is x.mean_score_teacher_right is x.teacher_wrong_exit_share is None
    assert d.early_exit_share == 0.0 and d.early_exit_error is None  # threshold 0: none early


def test_entropy_scores_and_a_group_without_images():
    labels = torch.tensor([0, 0, 0, 0])
    itself = ReferenceLogits("teacher", STUDENT, labels)
    d = diagnose(STUDENT, labels, threshold=0.5, teacher=itself, pairing=[1, 1])
    entropy = -(STUDENT.softmax(-1) * STUDENT.log_softmax(-1)).sum(-1)[:, 1]
    teacher_right = torch.tensor([True, True, False, True])  # teacher exit 2 predicts 0 0 1 0
    assert d.per_exit[1].mean_score_teacher_right == pytest.approx(
        float(entropy[teacher_right].mean()), abs=1e-6
    )
    d = diagnose(STUDENT, LABELS, threshold=0.5, teacher=ReferenceLogits("t", STUDENT, LABELS))
    assert d.per_exit[1].mean_score_teacher_wrong is None  # the final exit is never wrong
    assert d.teacher_wrong_share == 0.0 and d.per_exit[0].teacher_wrong_exit_share is None
    assert math.isfinite(d.per_exit[0].ece)


def test_a_reference_of_other_data_or_fewer_exits_is_refused():
    other = ReferenceLogits("teacher X", TEACHER.logits, torch.tensor([1, 0, 1, 0]))
    with pytest.raises(ErdeError, match="other test images or classes"):
        diagnose(STUDENT, LABELS, threshold=0.1, teacher=other)
    with pytest.raises(ErdeError, match=r"teacher exits \[1, 3\].*has 2 exits"):
        diagnose(STUDENT, LABELS, threshold=0.1, pairing=[0, 2], teacher=TEACHER)
