import math

import numpy as np
import pytest
import torch

from erde.errors import ErdeError
from erde.evaluation.metrics import auc, per_exit_accuracy
from erde.evaluation.policy import confidence_scores, simulate
from erde.evaluation.sweep import Curve, default_thresholds, grid_from_scores, sweep

K = 4
EXIT_MACS = [10.0, 20.0, 40.0]
LABELS = torch.tensor([0, 1, 2, 3, 1, 2, 3, 1])


def confident(cls: int) -> list[float]:
    row = [0.0] * K
    row[cls] = 20.0
    return row


def known_logits() -> torch.Tensor:
    """Exit 0 confident+right on images 0-3, flat on 4-7; exit 1 confident+right on 0-5,
    confidently wrong on 6, flat on 7; exit 2 confident+right everywhere."""
    flat = [0.0] * K
    e0 = [confident(int(y)) for y in LABELS[:4]] + [flat] * 4
    e1 = [confident(int(y)) for y in LABELS[:6]] + [confident(0), flat]
    e2 = [confident(int(y)) for y in LABELS]
    return torch.tensor([e0, e1, e2]).permute(1, 0, 2).contiguous()


def random_logits(n: int, e: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # per-image, per-exit temperature spreads confidences from flat to near-certain
    return torch.randn(n, e, k, generator=g) * torch.rand(n, e, 1, generator=g) * 6


def reference_point(logits, labels, exit_macs, theta, policy="entropy", normalize=False):
    """A point computed the slow, obvious way: simulate, then count."""
    exit_index, prediction = simulate(logits, float(theta), policy, normalize)
    e = logits.shape[1]
    share = np.bincount(exit_index.numpy(), minlength=e) / len(labels)
    accuracy = (prediction == labels).double().mean().item()
    macs = np.asarray(exit_macs)[exit_index.numpy()].mean()
    return accuracy, macs, share


def test_sweep_known_points():
    curve = sweep(known_logits(), LABELS, EXIT_MACS, thresholds=[0.0, 0.5, 100.0])
    np.testing.assert_array_equal(curve.accuracy, [1.0, 7 / 8, 0.5])
    np.testing.assert_allclose(curve.expected_macs, [40.0, 17.5, 10.0], rtol=1e-12)
    np.testing.assert_array_equal(curve.exit_share, [[0, 0, 1], [4 / 8, 3 / 8, 1 / 8], [1, 0, 0]])
    np.testing.assert_array_equal(curve.exit_macs, EXIT_MACS)


def test_per_exit_accuracy_known():
    np.testing.assert_array_equal(per_exit_accuracy(known_logits(), LABELS), [0.5, 6 / 8, 1.0])


@pytest.mark.parametrize(
    ("policy", "normalize"), [("entropy", False), ("entropy", True), ("maxprob", False)]
)
def test_sweep_equals_simulate_at_every_threshold(policy, normalize):
    logits = random_logits(150, 4, 10, seed=0)
    logits = torch.cat([logits, logits[:50]])  # duplicated images: tied scores
    labels = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(1))
    scores = confidence_scores(logits, policy, normalize).numpy()
    # the default grid plus every score itself, where "<" versus "<=" would differ
    thresholds = np.concatenate(
        [default_thresholds(logits, policy, normalize, n=100), scores[:60, :3].reshape(-1)]
    )
    exit_macs = [1, 2, 3, 5]
    curve = sweep(logits, labels, exit_macs, thresholds, policy, normalize)
    for t, theta in enumerate(curve.thresholds):
        accuracy, macs, share = reference_point(logits, labels, exit_macs, theta, policy, normalize)
        assert curve.accuracy[t] == accuracy
        np.testing.assert_array_equal(curve.exit_share[t], share)
        assert curve.expected_macs[t] == pytest.approx(macs, rel=1e-12)


def test_sweep_with_1000_thresholds():
    logits = random_logits(2000, 4, 10, seed=2)
    labels = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(3))
    exit_macs = [1e6, 2e6, 3e6, 4e6]
    thresholds = np.linspace(0.0, 1.1 * math.log(10), 1000)
    curve = sweep(logits, labels, exit_macs, thresholds)
    assert curve.accuracy.shape == curve.expected_macs.shape == (1000,)
    assert curve.exit_share.shape == (1000, 4)
    np.testing.assert_allclose(curve.exit_share.sum(axis=1), 1.0, rtol=1e-12)
    # a larger threshold lets every image leave no later, so compute never grows
    assert np.all(np.diff(curve.expected_macs) <= 1e-6)
    assert curve.expected_macs[0] == 4e6 and curve.expected_macs[-1] == 1e6
    for t in range(0, 1000, 111):
        accuracy, macs, share = reference_point(logits, labels, exit_macs, thresholds[t])
        assert curve.accuracy[t] == accuracy
        np.testing.assert_array_equal(curve.exit_share[t], share)
        assert curve.expected_macs[t] == pytest.approx(macs, rel=1e-12)


def test_default_thresholds_span_full_model_to_first_exit():
    logits = random_logits(500, 3, 10, seed=4)
    labels = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(5))
    grid = default_thresholds(logits, n=50)
    assert 2 < len(grid) <= 50 and grid[0] == 0.0 and np.all(np.diff(grid) > 0)
    curve = sweep(logits, labels, [1, 2, 3])
    assert curve.exit_share[0].tolist() == [0, 0, 1]  # theta 0: the full model
    assert curve.exit_share[-1].tolist() == [1, 0, 0]  # above every score: the first exit
    assert len(curve.thresholds) > 100  # dense enough for a smooth curve


def test_an_empty_split_sweeps_to_zeros_not_nan():
    """No images: every point has accuracy 0, no exit shares and no MACs (never 0 / 0)."""
    curve = sweep(torch.zeros(0, 3, K), torch.zeros(0, dtype=torch.long), EXIT_MACS, [0.0, 1.0])
    np.testing.assert_array_equal(curve.accuracy, [0.0, 0.0])
    np.testing.assert_array_equal(curve.exit_share, np.zeros((2, 3)))
    np.testing.assert_array_equal(curve.expected_macs, [0.0, 0.0])


def test_single_exit_sweep():
    logits = known_logits()[:, :1]
    curve = sweep(logits, LABELS, [10.0])
    np.testing.assert_array_equal(curve.accuracy, [0.5])
    np.testing.assert_array_equal(curve.exit_share, [[1.0]])


def test_to_rows():
    rows = sweep(known_logits(), LABELS, EXIT_MACS, thresholds=[0.5]).to_rows()
    assert rows == [
        {
            "threshold": 0.5,
            "accuracy": 0.875,
            "expected_macs": 17.5,
            "exit1_share": 0.5,
            "exit2_share": 0.375,
            "exit3_share": 0.125,
        }
    ]


@pytest.mark.parametrize(
    ("labels", "exit_macs", "thresholds", "match"),
    [
        (LABELS[:5], EXIT_MACS, None, "8 integer class indices"),
        (LABELS.float(), EXIT_MACS, None, "integer"),
        (LABELS + 1, EXIT_MACS, None, r"\[0, 3\]"),
        (LABELS, [10.0, 20.0], None, "one per exit"),
        (LABELS, [10.0, 40.0, 20.0], None, "increase"),
        (LABELS, EXIT_MACS, [0.1, math.nan], "non-negative"),
        (LABELS, EXIT_MACS, [], "non-empty"),
    ],
)
def test_sweep_input_errors(labels, exit_macs, thresholds, match):
    with pytest.raises(ErdeError, match=match):
        sweep(known_logits(), labels, exit_macs, thresholds)


def hand_curve(macs, accuracy, exit_macs=(10.0, 40.0)) -> Curve:
    """A two-exit curve whose exit shares agree with its expected MACs."""
    macs = np.asarray(macs, dtype=float)
    late = (macs - exit_macs[0]) / (exit_macs[1] - exit_macs[0])
    return Curve(
        thresholds=np.linspace(1.0, 0.0, len(macs)),
        accuracy=np.asarray(accuracy, dtype=float),
        expected_macs=macs,
        exit_share=np.stack([1 - late, late], axis=1),
        exit_macs=np.asarray(exit_macs, dtype=float),
    )


def test_auc_of_flat_curve_is_its_accuracy():
    assert auc(hand_curve([10, 17, 33, 40], [0.7] * 4)) == pytest.approx(0.7)


def test_auc_hand_values():
    # x from 0.25 to 1: a straight line from 0.5 to 1.0 averages 0.75
    assert auc(hand_curve([40, 10], [1.0, 0.5])) == pytest.approx(0.75)
    # 0.6 flat over [0.25, 0.625], then 0.6 -> 0.9 over [0.625, 1]: (0.225 + 0.28125) / 0.75
    assert auc(hand_curve([10, 25, 40], [0.6, 0.6, 0.9])) == pytest.approx(0.675)
    # a curve that stops at 25 MACs is held at its first accuracy down to the first exit
    assert auc(hand_curve([40, 25], [0.9, 0.6])) == pytest.approx(0.675)
    # relative to an 80-MAC model: x0 = 0.125, 0.9 held from 0.5 to 1
    expected = (0.1875 * 0.6 + 0.1875 * 0.75 + 0.5 * 0.9) / 0.875
    assert auc(hand_curve([10, 25, 40], [0.6, 0.6, 0.9]), 80.0) == pytest.approx(expected)
    with pytest.raises(ErdeError, match="last-exit cost"):
        auc(hand_curve([10, 40], [0.5, 0.9]), 20.0)


def distinct_scores(n: int, e: int, seed: int) -> np.ndarray:
    """N x E float32 scores in (0.5, 1.5), all different, so every quantile is its own point."""
    rng = np.random.default_rng(seed)
    return (0.5 + rng.permutation(n * e).reshape(n, e) / (n * e)).astype(np.float32)


def test_the_default_grid_has_exactly_1000_thresholds_from_0_to_just_past_the_top():
    scores = distinct_scores(2500, 3, seed=0)  # 5,000 deciding scores, exits 1 and 2
    grid = grid_from_scores(scores)
    m = np.minimum.accumulate(scores[:, :2], axis=1)
    assert len(grid) == 1000 and grid.dtype == np.float64
    assert grid[0] == 0.0 and np.all(np.diff(grid) > 0)
    assert grid[-1] == np.nextafter(m.max(), np.float32(np.inf)) and grid[-1] > m.max()
    assert set(grid[1:-1]) <= set(m.reshape(-1).astype(np.float64))  # inner points are scores


def test_a_grid_of_2_is_the_two_ends_and_a_grid_of_1_is_refused():
    scores = distinct_scores(50, 2, seed=1)
    top = np.nextafter(scores[:, 0].max(), np.float32(np.inf))
    assert grid_from_scores(scores, n=2).tolist() == [0.0, float(top)]
    with pytest.raises(ErdeError) as caught:
        grid_from_scores(scores, n=1)
    assert str(caught.value) == "a threshold grid needs at least 2 points; got n=1."
