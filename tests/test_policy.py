import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from erde.errors import ErdeError
from erde.evaluation.policy import (
    confidence_scores,
    exits_from_scores,
    maxprob_threshold,
    simulate,
)

SCALE = 20.0  # a one-hot logit of 20 gives top probability 1 - 3e-9 with 4 classes
K = 4


def confident(cls: int) -> list[float]:
    row = [0.0] * K
    row[cls] = SCALE
    return row


FLAT = [0.0] * K
LABELS = torch.tensor([0, 1, 2, 3, 1, 2, 3, 1])


def known_logits() -> torch.Tensor:
    """8 images, 3 exits. Exit 0 is confident and right on images 0-3 and flat on 4-7; exit 1 is
    confident and right on 0-5, confidently wrong on 6 (says class 0), flat on 7; exit 2 is
    confident and right everywhere."""
    e0 = [confident(int(y)) for y in LABELS[:4]] + [FLAT] * 4
    e1 = [confident(int(y)) for y in LABELS[:6]] + [confident(0), FLAT]
    e2 = [confident(int(y)) for y in LABELS]
    return torch.tensor([e0, e1, e2]).permute(1, 0, 2).contiguous()


def test_scores_match_hand_values():
    # softmax of [ln 3, 0, 0, 0] is [1/2, 1/6, 1/6, 1/6]
    logits = torch.tensor([[[math.log(3.0), 0.0, 0.0, 0.0]]])
    entropy = 0.5 * math.log(2) + 0.5 * math.log(6)
    assert confidence_scores(logits, "entropy").item() == pytest.approx(entropy, rel=1e-6)
    normalized = confidence_scores(logits, "entropy", normalize=True).item()
    assert normalized == pytest.approx(entropy / math.log(4), rel=1e-6)
    assert confidence_scores(logits, "maxprob").item() == pytest.approx(0.5, rel=1e-6)
    flat = torch.zeros(1, 1, K)
    assert confidence_scores(flat, "entropy").item() == pytest.approx(math.log(K), rel=1e-6)
    assert confidence_scores(flat, "entropy", True).item() == pytest.approx(1.0, rel=1e-6)
    assert confidence_scores(flat, "maxprob").item() == pytest.approx(0.75, rel=1e-6)


def test_scores_stable_for_extreme_and_half_precision_logits():
    logits = torch.tensor([[[1e4, -1e4, 0, 0], [1e4, 1e4, -1e4, -1e4], [-1e4, -1e4, -1e4, -1e4]]])
    for dtype in (torch.float32, torch.float16):
        entropy = confidence_scores(logits.to(dtype), "entropy")
        maxprob = confidence_scores(logits.to(dtype), "maxprob")
        assert entropy.dtype == torch.float32
        np.testing.assert_allclose(entropy[0].numpy(), [0.0, math.log(2), math.log(4)], atol=1e-6)
        np.testing.assert_allclose(maxprob[0].numpy(), [0.0, 0.5, 0.75], atol=1e-6)


def test_half_precision_scores_match_float64_reference():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 3, 10, generator=g) * 8).half()
    p = scipy.special.softmax(logits.double().numpy(), axis=-1)
    np.testing.assert_allclose(
        confidence_scores(logits, "entropy").numpy(), scipy.stats.entropy(p, axis=-1), atol=1e-5
    )
    np.testing.assert_allclose(
        confidence_scores(logits, "maxprob").numpy(), 1 - p.max(axis=-1), atol=1e-6
    )


def test_maxprob_precision_near_certainty():
    # top probability 1 - 3e-9: 1 - p in float32 arithmetic would round to 0
    score = confidence_scores(torch.tensor([[confident(0)]]), "maxprob").item()
    assert score == pytest.approx(3 * math.exp(-SCALE), rel=1e-4)


def numpy_margin(logits: np.ndarray) -> np.ndarray:
    """1 - (p1 - p2) in float64, the two largest softmax probabilities found by sorting."""
    p = np.sort(scipy.special.softmax(logits.astype(np.float64), axis=-1), axis=-1)
    return 1.0 - (p[..., -1] - p[..., -2])


def test_margin_matches_an_independent_numpy_formula():
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((200, 3, 10)) * rng.uniform(0.1, 8, (200, 3, 1))).astype(
        np.float32
    )
    scores = confidence_scores(torch.from_numpy(logits), "margin").numpy()
    np.testing.assert_allclose(scores, numpy_margin(logits), atol=2e-6, rtol=0)
    assert scores.min() >= 0 and scores.max() <= 1


def test_margin_range_ends_and_precision_near_certainty():
    # flat: p1 = p2, margin score 1; two tied leaders: 1 whatever the rest; near certainty:
    # 1 - p1 + p2 = 4 e^-20 / (1 + 3 e^-20), which float32 1 - p1 would round to 0 + p2.
    rows = torch.tensor([[FLAT, [5.0, 5.0, 0.0, -3.0], confident(2)]])
    scores = confidence_scores(rows, "margin")[0]
    assert scores[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert scores[2].item() == pytest.approx(4 * math.exp(-SCALE), rel=1e-4)
    # "exit when the top class leads the runner-up by more than 0.9": theta = 1 - 0.9
    assert simulate(known_logits(), 0.1, "margin")[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2]


def test_two_class_scores_follow_the_smaller_probability():
    """With K = 2 every built-in is a function of the smaller probability q alone: entropy the
    binary entropy of q, maxprob q, margin 1 - (1 - 2q) = 2q (a binary classifier is common)."""
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0], [-0.5, 3.0], [9.0, 8.9]])
    z = logits.double().numpy()
    q = 1.0 / (1.0 + np.exp(np.abs(z[:, 0] - z[:, 1])))
    expected = {
        "entropy": -(q * np.log(q) + (1 - q) * np.log(1 - q)),
        "maxprob": q,
        "margin": 2 * q,
    }
    for policy, want in expected.items():
        got = confidence_scores(logits[:, None], policy)[:, 0].numpy()  # one exit
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0, err_msg=policy)


@pytest.mark.parametrize(
    ("threshold", "exits", "predictions"),
    [
        (0.5, [0, 0, 0, 0, 1, 1, 1, 2], [0, 1, 2, 3, 1, 2, 0, 1]),
        (0.0, [2] * 8, LABELS.tolist()),
        (1e6, [0] * 8, [0, 1, 2, 3, 0, 0, 0, 0]),
        (math.inf, [0] * 8, [0, 1, 2, 3, 0, 0, 0, 0]),
        ([0.0, 0.5], [1, 1, 1, 1, 1, 1, 1, 2], [0, 1, 2, 3, 1, 2, 0, 1]),
        ([0.5, 0.0], [0, 0, 0, 0, 2, 2, 2, 2], LABELS.tolist()),
        ([0.5, 0.0, 123.0], [0, 0, 0, 0, 2, 2, 2, 2], LABELS.tolist()),
    ],
)
def test_simulate_known_exits(threshold, exits, predictions):
    exit_index, prediction = simulate(known_logits(), threshold)
    assert exit_index.tolist() == exits
    assert prediction.tolist() == predictions
    assert exit_index.dtype == prediction.dtype == torch.int64


def test_simulate_normalized_and_maxprob_policies():
    logits = known_logits()
    expected = [0, 0, 0, 0, 1, 1, 1, 2]
    assert simulate(logits, 0.5, "entropy", normalize=True)[0].tolist() == expected
    assert simulate(logits, maxprob_threshold(0.9), "maxprob")[0].tolist() == expected
    # flat exits have top probability 0.25: a 0.2 level lets every exit answer
    assert simulate(logits, maxprob_threshold(0.2), "maxprob")[0].tolist() == [0] * 8


@pytest.mark.parametrize("policy", ["entropy", "maxprob", "margin"])
def test_a_score_equal_to_its_threshold_does_not_exit(policy: str) -> None:
    """The rule is strict: at theta = the flat rows' own float32 score, they stay; one float32
    step above it, they leave at exit 0 (flat: entropy log 4, 1 - max p = 3/4, margin 1)."""
    logits = known_logits()
    flat = confidence_scores(logits, policy)[4, 0]
    flat_score = {"entropy": math.log(K), "maxprob": 0.75, "margin": 1.0}[policy]
    assert float(flat) == pytest.approx(flat_score, rel=1e-6)
    exit_index, _ = simulate(logits, float(flat), policy)
    assert exit_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    above = float(np.nextafter(np.float32(flat), np.float32(np.inf)))
    assert simulate(logits, above, policy)[0].tolist() == [0] * 8
    # per exit: exit 0 at the tie keeps 4-7; exit 1 at the tie keeps the flat image 7
    assert simulate(logits, [float(flat), float(flat)], policy)[0].tolist()[4:] == [1, 1, 1, 2]


def test_exits_from_scores_at_exact_ties() -> None:
    """Scores equal to their exit's threshold go on; the last exit answers whatever its score."""
    scores = torch.tensor([[0.5, 0.25, 9.0], [0.25, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    got = exits_from_scores(scores, torch.tensor([0.5, 0.5]))
    assert got.tolist() == [1, 0, 2, 0]
    assert exits_from_scores(scores, torch.tensor([0.25, 0.5])).tolist() == [1, 2, 2, 0]
    assert exits_from_scores(scores, torch.tensor([0.0, 0.0])).tolist() == [2, 2, 2, 2]


def test_maxprob_threshold():
    assert maxprob_threshold(0.9) == pytest.approx(0.1)
    assert maxprob_threshold(1.0) == 0.0
    with pytest.raises(ErdeError, match=r"\[0, 1\]"):
        maxprob_threshold(1.5)


def test_single_exit_always_answers():
    logits = known_logits()[:, 2:]
    exit_index, prediction = simulate(logits, 0.0)
    assert exit_index.tolist() == [0] * 8
    assert prediction.tolist() == LABELS.tolist()


@pytest.mark.parametrize("threshold", [math.nan, -0.1, [0.5, math.nan], [0.1, -1.0]])
def test_invalid_thresholds(threshold):
    with pytest.raises(ErdeError, match="non-negative"):
        simulate(known_logits(), threshold)


def test_wrong_number_of_thresholds():
    with pytest.raises(ErdeError, match="3 exits"):
        simulate(known_logits(), [0.1, 0.2, 0.3, 0.4])


def test_bad_inputs():
    with pytest.raises(ErdeError, match="unknown exit policy"):
        confidence_scores(known_logits(), "top3")
    with pytest.raises(ErdeError, match="shape"):
        confidence_scores(torch.zeros(8, 4))
    with pytest.raises(ErdeError, match="NaN or infinite"):
        confidence_scores(torch.tensor([[[math.nan, 0.0]]]))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("policy", ["entropy", "maxprob", "margin"])
def test_logits_that_are_not_finite_blame_the_model_or_the_cache(policy, bad):
    logits = torch.zeros(3, 2, 4)
    logits[2, 1, 3] = bad
    with pytest.raises(ErdeError) as caught:
        confidence_scores(logits, policy)
    assert str(caught.value) == (
        "per-exit logits contain NaN or infinite values (the model diverged or the cache is "
        "corrupt); retrain with a lower learning rate or re-create the logits cache."
    )
