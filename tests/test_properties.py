"""Properties of the exit policy and the threshold sweep for any outputs (hypothesis), and the
numerical guards of the entropy computations at extreme logits and in float16.

The loss properties live in test_losses.py.
"""

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from erde.config.methods import ENTROPY_TERMS, methods
from erde.distill.losses import make_loss
from erde.evaluation.policy import confidence_scores, simulate
from erde.evaluation.sweep import sweep

POLICIES = [("entropy", False), ("entropy", True), ("maxprob", False), ("margin", False)]


@st.composite
def exit_outputs(draw):
    """Per-exit logits, labels and increasing cumulative MACs of a small early-exit model.

    Logits are small integers times a scale, so exits often tie exactly (equal scores), and the
    scale reaches 1e3 where softmax saturates.
    """
    n, e, k = draw(st.integers(1, 12)), draw(st.integers(1, 4)), draw(st.integers(2, 5))
    steps = draw(hnp.arrays(np.float32, (n, e, k), elements=st.integers(-4, 4).map(float)))
    scale = draw(st.sampled_from([0.25, 1.0, 3.0, 1e3]))
    labels = draw(hnp.arrays(np.int64, n, elements=st.integers(0, k - 1)))
    costs = draw(st.lists(st.integers(1, 10**6), min_size=e, max_size=e))
    return torch.from_numpy(steps * scale), torch.from_numpy(labels), np.cumsum(costs, dtype=float)


@st.composite
def thresholds_for(draw, logits, policy, normalize):
    """Thresholds from 0 to beyond every score, half of them equal to some image's score."""
    scores = confidence_scores(logits, policy, normalize).flatten().tolist()
    exact = st.sampled_from(scores)
    anywhere = st.floats(0.0, 2.0 * math.log(logits.shape[-1]), allow_nan=False)
    return draw(st.lists(st.one_of(exact, anywhere, st.just(0.0)), min_size=1, max_size=8))


def first_confident_exit(scores: list[float], theta: float) -> int:
    """The rule in plain Python: the first exit whose score is below theta, else the last.

    Thresholds are compared in float32, the scores' precision (`exit_thresholds`): a threshold
    that rounds to 0 in float32 lets nothing out, even a score of exactly 0.
    """
    theta = float(np.float32(theta))
    return next((i for i, s in enumerate(scores[:-1]) if s < theta), len(scores) - 1)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), outputs=exit_outputs(), policy=st.sampled_from(POLICIES))
def test_simulate_takes_the_first_confident_exit_and_never_passes_the_last(data, outputs, policy):
    logits, _, _ = outputs
    theta = data.draw(thresholds_for(logits, *policy))[0]
    exit_index, prediction = simulate(logits, theta, *policy)
    scores = confidence_scores(logits, *policy).tolist()
    n, e, _ = logits.shape
    assert exit_index.tolist() == [first_confident_exit(scores[i], theta) for i in range(n)]
    assert exit_index.min() >= 0 and exit_index.max() <= e - 1
    assert prediction.tolist() == [int(logits[i, x].argmax()) for i, x in enumerate(exit_index)]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), outputs=exit_outputs(), policy=st.sampled_from(POLICIES))
def test_sweep_points_are_valid_monotone_and_equal_simulate(data, outputs, policy):
    logits, labels, cum_macs = outputs
    thresholds = np.sort(data.draw(thresholds_for(logits, *policy)))
    curve = sweep(logits, labels, cum_macs, thresholds, *policy)

    assert np.all((curve.accuracy >= 0.0) & (curve.accuracy <= 1.0))
    lo, hi = cum_macs[0], cum_macs[-1]
    assert np.all(
        (lo * (1 - 1e-12) <= curve.expected_macs) & (curve.expected_macs <= hi * (1 + 1e-12))
    )
    # Raising theta lets images leave earlier: expected MACs never grow.
    assert np.all(np.diff(curve.expected_macs) <= 1e-9 * hi)
    assert np.all(curve.exit_share >= 0)
    np.testing.assert_allclose(curve.exit_share.sum(axis=1), 1.0, rtol=1e-12)

    n, e, _ = logits.shape
    for t, theta in enumerate(thresholds):
        exit_index, prediction = simulate(logits, float(theta), *policy)
        share = np.bincount(exit_index.numpy(), minlength=e) / n
        np.testing.assert_allclose(curve.exit_share[t], share, rtol=1e-12, atol=1e-15)
        assert curve.accuracy[t] == pytest.approx((prediction == labels).double().mean().item())
        assert curve.expected_macs[t] == pytest.approx(cum_macs[exit_index.numpy()].mean())


@settings(max_examples=60, deadline=None)
@given(outputs=exit_outputs(), policy=st.sampled_from(POLICIES))
def test_sweep_ends_are_the_full_model_and_the_first_exit(outputs, policy):
    logits, labels, cum_macs = outputs
    beyond = 1.0 + math.log(logits.shape[-1])  # above every entropy and maxprob score
    curve = sweep(logits, labels, cum_macs, [0.0, beyond], *policy)
    correct = (logits.argmax(-1) == labels[:, None]).double().mean(0).numpy()
    assert curve.expected_macs[0] == pytest.approx(cum_macs[-1])
    assert curve.accuracy[0] == pytest.approx(correct[-1])
    assert curve.expected_macs[1] == pytest.approx(cum_macs[0])
    assert curve.accuracy[1] == pytest.approx(correct[0])


# Numerical guards: the entropy computations at logits of +/-1e4 and in float16.

# One exit, 3 classes, labels 0, 1, 2; logits exactly representable in float16.
EXTREME = [[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4], [1e4, 0.0, -1e4]]
EXTREME_LABELS = [0, 1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("entropy_term", ENTROPY_TERMS)
def test_erde_loss_at_extreme_logits_has_the_hand_computed_value(dtype, entropy_term):
    """Teacher outputs are flat, so its argmax is class 0: right on image 0 only.

    By hand (exp(-1e4) is 0 in every float format): CE = 0, 0, 2e4. KL with T = 4 against the
    flat teacher is T^2 (-log 3 - mean_k log q_k) with log q of s/T: 16 (2500 - log 3) on image
    0, masked elsewhere. The entropy term on images 1 and 2 (teacher wrong): uniform-ce is
    -mean_k log p_k = 4e4/3 and 1e4; neg-entropy is sum_k p_k log p_k = 0 for one-hot outputs.
    """
    student = torch.tensor(EXTREME, dtype=dtype, requires_grad=True)
    teacher = torch.zeros(3, 3, dtype=dtype)
    loss = make_loss("erde", entropy_term=entropy_term, beta=1.0, num_exits=1)
    result = loss([student], torch.tensor(EXTREME_LABELS), [teacher])
    result.total.backward()
    ce = 2e4 / 3
    kl = 16 * (2500 - math.log(3)) / 3
    entropy = (4e4 / 3 + 1e4) / 3 if entropy_term == "uniform-ce" else 0.0
    assert result.components["ce/1"].item() == pytest.approx(ce, rel=1e-6)
    assert result.components["kl/1"].item() == pytest.approx(kl, rel=1e-6)
    assert result.components["entropy/1"].item() == pytest.approx(entropy, rel=1e-6, abs=1e-6)
    assert result.total.item() == pytest.approx(0.5 * ce + 0.5 * kl + entropy, rel=1e-6)
    assert torch.isfinite(student.grad).all()


@settings(max_examples=60, deadline=None)
@given(
    logits=hnp.arrays(np.float16, (2, 4, 5), elements=st.floats(-1e4, 1e4, width=16)),
    labels=hnp.arrays(np.int64, 4, elements=st.integers(0, 4)),
    method=st.sampled_from(methods()),
    entropy_term=st.sampled_from(ENTROPY_TERMS),
)
def test_float16_losses_equal_their_float64_value(logits, labels, method, entropy_term):
    """Half-precision logits anywhere in +/-1e4 give the loss and the gradient that the same
    (already rounded) numbers give in float64: nothing overflows or cancels in between."""
    totals, grads = [], []
    for dtype in (torch.float16, torch.float64):
        student = torch.tensor(logits[0], dtype=dtype, requires_grad=True)
        teacher = [torch.tensor(logits[1], dtype=dtype)]
        result = make_loss(method, entropy_term=entropy_term, num_exits=1)(
            [student], torch.from_numpy(labels), teacher
        )
        result.total.backward()
        totals.append(result.total.item())
        grads.append(student.grad.double())
    assert math.isfinite(totals[0]) and torch.isfinite(grads[0]).all()
    assert totals[0] == pytest.approx(totals[1], rel=1e-5, abs=1e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-2, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(logits=hnp.arrays(np.float16, (6, 2, 4), elements=st.floats(-1e4, 1e4, width=16)))
def test_float16_scores_match_float64_over_the_whole_range(logits):
    """Entropy and 1 - max probability from half-precision logits anywhere in +/-1e4 match
    scipy's float64 values; float32 rounding of log-probabilities near 1e4 is below 1e-3."""
    p = scipy.special.softmax(logits.astype(np.float64), axis=-1)
    half = torch.from_numpy(logits)
    entropy = confidence_scores(half, "entropy").numpy()
    np.testing.assert_allclose(entropy, scipy.stats.entropy(p, axis=-1), atol=1e-3)
    assert np.all((entropy >= 0) & (entropy <= math.log(4) + 1e-6))
    maxprob = confidence_scores(half, "maxprob").numpy()
    np.testing.assert_allclose(maxprob, 1 - p.max(axis=-1), atol=1e-6)


def test_simulate_and_sweep_decide_extreme_float16_outputs_correctly():
    """Exit 0 is one-hot (entropy 0) and right on image 0, and a two-way tie (entropy log 2,
    argmax class 0, wrong) on image 1; exit 1 is one-hot, wrong on image 0 and right on image 1.
    Between theta = 0 and log 2 only image 0 leaves early, and both answers are right."""
    logits = torch.tensor(
        [
            [[1e4, -1e4, -1e4, -1e4], [-1e4, 1e4, -1e4, -1e4]],
            [[1e4, 1e4, -1e4, -1e4], [-1e4, -1e4, 1e4, -1e4]],
        ],
        dtype=torch.float16,
    )
    exit_index, prediction = simulate(logits, 0.5)
    assert exit_index.tolist() == [0, 1] and prediction.tolist() == [0, 2]
    curve = sweep(logits, torch.tensor([0, 2]), [1.0, 3.0], [0.0, 0.5, math.log(2) + 1e-3])
    np.testing.assert_allclose(curve.expected_macs, [3.0, 2.0, 1.0])
    np.testing.assert_allclose(curve.accuracy, [0.5, 1.0, 0.5])
