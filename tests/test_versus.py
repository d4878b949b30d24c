"""`versus`: above / below / within-spread stretches of two seed groups, against boundaries
solved by hand for straight-line curves."""

from __future__ import annotations

import numpy as np
import pytest

from erde.errors import ErdeError
from erde.evaluation.sweep import Curve
from erde.evaluation.versus import ABOVE, BELOW, WITHIN, describe, versus


def line(lo: float, hi: float, acc_lo: float, acc_hi: float, n: int = 50) -> Curve:
    macs = np.linspace(lo, hi, n)
    acc = np.linspace(acc_lo, acc_hi, n)
    share = np.tile([0.0, 1.0], (n, 1))
    return Curve(np.arange(n, dtype=float), acc, macs, share, np.array([lo, hi]))


def test_stretches_match_the_hand_solved_crossings():
    # A: 0.70 -> 0.80 over 1-2 M MACs, seeds offset by -d, 0, +d (sample std = d exactly);
    # B: flat 0.75, same offsets. Bands (±d) separate where |0.70 + 0.1 x - 0.75| > 2 d,
    # x = (MACs - 1 M) / 1 M: below for x < 0.5 - 20 d, above for x > 0.5 + 20 d.
    d = 0.005
    a = [line(1e6, 2e6, 0.70 + o, 0.80 + o) for o in (-d, 0, d)]
    b = [line(1e6, 2e6, 0.75 + o, 0.75 + o) for o in (-d, 0, d)]
    v = versus(a, b, n_points=1001)
    assert [s.verdict for s in v.stretches] == [BELOW, WITHIN, ABOVE]
    below, within, above = v.stretches
    step = 1e6 / 1000
    assert below.lo_macs == pytest.approx(1e6)
    assert within.lo_macs == pytest.approx(1e6 + (0.5 - 20 * d) * 1e6, abs=step)
    assert above.lo_macs == pytest.approx(1e6 + (0.5 + 20 * d) * 1e6, abs=step)
    assert above.hi_macs == pytest.approx(2e6)
    assert v.share(ABOVE) == pytest.approx(0.4, abs=0.002)
    assert v.share(WITHIN) == pytest.approx(0.2, abs=0.002)
    # mean gap over [0.6, 1]: 0.70 + 0.1 x - 0.75 averaged = 0.03
    assert above.mean_gap == pytest.approx(0.03, abs=5e-4)
    assert (v.seeds_a, v.seeds_b) == (3, 3)


def test_only_the_range_every_curve_covers_is_compared():
    a = [line(1e6, 3e6, 0.8, 0.8)]
    b = [line(2e6, 4e6, 0.7, 0.7), line(1.5e6, 3.5e6, 0.7, 0.7)]
    v = versus(a, b)
    assert (v.lo_macs, v.hi_macs) == (2e6, 3e6)
    assert [s.verdict for s in v.stretches] == [ABOVE]  # b's spread is 0: any gap counts
    text = describe(v, "erde", "kd")
    assert "erde (1 seed) against kd (2 seeds) over 2.00-3.00 M MACs" in text
    assert "above (100 % of the range" in text and "+10.00 pt" in text


def test_disjoint_groups_are_refused():
    with pytest.raises(ErdeError, match="share no MACs range"):
        versus([line(1e6, 2e6, 0.5, 0.6)], [line(3e6, 4e6, 0.5, 0.6)])


@pytest.mark.parametrize("swap", [False, True])
def test_touching_bands_are_within_spread_not_above_or_below(swap: bool) -> None:
    """A's band is [0.5, 0.75] and B's [0.25, 0.5] (offsets ±0.125, sample std 0.125, all exact
    in binary): the bands touch at 0.5, which is no separation. A hair lower for B separates."""
    a = [line(1e6, 2e6, acc, acc) for acc in (0.5, 0.625, 0.75)]
    b = [line(1e6, 2e6, acc, acc) for acc in (0.25, 0.375, 0.5)]
    first, second = (b, a) if swap else (a, b)
    touching = versus(first, second, n_points=11)
    assert [s.verdict for s in touching.stretches] == [WITHIN]
    assert touching.share(WITHIN) == 1.0
    lower = [line(1e6, 2e6, acc - 2**-20, acc - 2**-20) for acc in (0.25, 0.375, 0.5)]
    first, second = (lower, a) if swap else (a, lower)
    apart = versus(first, second, n_points=11)
    assert [s.verdict for s in apart.stretches] == [BELOW if swap else ABOVE]


def test_equal_single_seeds_are_within_spread() -> None:
    """One seed each: the std is 0, so equal curves touch everywhere and neither is above."""
    a = [line(1e6, 2e6, 0.6, 0.8)]
    v = versus(a, [line(1e6, 2e6, 0.6, 0.8)], n_points=21)
    assert [s.verdict for s in v.stretches] == [WITHIN]
    assert v.stretches[0].mean_gap == 0.0


def test_one_empty_side_is_refused() -> None:
    c = line(1e6, 2e6, 0.5, 0.6)
    for a, b in (([], [c]), ([c], []), ([], [])):
        with pytest.raises(ValueError, match=r"^versus needs at least one curve on each side$"):
            versus(a, b)


@pytest.mark.parametrize(
    "acc_a, acc_b, verdict",
    [
        ((0.5, 0.75), (0.5,), WITHIN),  # A: mean 0.625, std 0.177 reaches below 0.5
        ((0.5,), (0.5, 0.75), WITHIN),  # the mirror
        ((0.75,), (0.5,), ABOVE),  # one seed each: std 0, any gap counts
        ((0.5,), (0.75,), BELOW),
    ],
)
def test_two_seeds_have_a_spread_and_one_seed_has_none(acc_a, acc_b, verdict) -> None:
    a = [line(1e6, 2e6, acc, acc) for acc in acc_a]
    b = [line(1e6, 2e6, acc, acc) for acc in acc_b]
    assert [s.verdict for s in versus(a, b, n_points=5).stretches] == [verdict]


def big(points: list[tuple[float, float]]) -> Curve:
    """A curve through (MACs, accuracy) points, exits at its first and last MACs."""
    macs, acc = (np.array(v, dtype=float) for v in zip(*points, strict=True))
    share = np.tile([0.0, 1.0], (len(macs), 1))
    return Curve(np.arange(len(macs), dtype=float), acc, macs, share, macs[[0, -1]])


def test_stretch_edges_and_the_sentence_on_a_five_point_grid() -> None:
    """Grid 8, 10, 12, 14, 16 G MACs; A through (8 G, 0.25), (12 G, 0.75), (16 G, 0.75) is 0.25,
    0.5, 0.75, 0.75, 0.75 there, B is 0.5: below, touching (within), then above. MACs this large
    print with enough digits that a wrong unit shows."""
    a = [big([(8e9, 0.25), (12e9, 0.75), (16e9, 0.75)])]
    b = [big([(8e9, 0.5), (16e9, 0.5)])]
    v = versus(a, b, n_points=5)
    got = [(s.lo_macs, s.hi_macs, s.verdict, s.mean_gap) for s in v.stretches]
    assert got == [(8e9, 10e9, BELOW, -0.25), (10e9, 12e9, WITHIN, 0.0), (12e9, 16e9, ABOVE, 0.25)]
    assert (v.share(BELOW), v.share(WITHIN), v.share(ABOVE)) == (0.25, 0.25, 0.5)
    assert describe(v, "erde", "kd") == (
        "erde (1 seed) against kd (1 seed) over 8000.00-16000.00 M MACs: "
        "above (50 % of the range: 12000.00-16000.00 M; mean gap +25.00 pt); "
        "within spread (25 % of the range: 10000.00-12000.00 M; mean gap +0.00 pt); "
        "below (25 % of the range: 8000.00-10000.00 M; mean gap -25.00 pt)."
    )
    dip = [big([(8e9, 0.75), (10e9, 0.75), (12e9, 0.5), (14e9, 0.75), (16e9, 0.75)])]
    assert describe(versus(dip, b, n_points=5), "erde", "kd") == (
        "erde (1 seed) against kd (1 seed) over 8000.00-16000.00 M MACs: "
        "above (75 % of the range: 8000.00-12000.00 M, 14000.00-16000.00 M; mean gap +25.00 pt); "
        "within spread (25 % of the range: 12000.00-14000.00 M; mean gap +0.00 pt)."
    )
    only_below = versus(b, [big([(8e9, 0.75), (16e9, 0.75)])], n_points=5)
    assert describe(only_below, "kd", "ce") == (
        "kd (1 seed) against ce (1 seed) over 8000.00-16000.00 M MACs: "
        "below (100 % of the range: 8000.00-16000.00 M; mean gap -25.00 pt)."
    )


def test_shares_of_a_range_of_one_point_or_under_one_mac() -> None:
    """Curves that share only 2 M MACs: one stretch of width 0, its verdict's share is 1. Over a
    range of half a MAC the shares are still measured."""
    point = versus([line(1e6, 2e6, 0.8, 0.8)], [line(2e6, 3e6, 0.7, 0.7)], n_points=4)
    assert (point.lo_macs, point.hi_macs) == (2e6, 2e6)
    assert (point.share(ABOVE), point.share(WITHIN), point.share(BELOW)) == (1.0, 0.0, 0.0)
    a = [big([(1.0, 0.25), (1.5, 0.75)])]
    half = versus(a, [big([(1.0, 0.5), (1.5, 0.5)])], n_points=5)
    # A is 0.25, 0.375, 0.5, 0.625, 0.75 on the grid: below over half the range
    assert (half.share(BELOW), half.share(WITHIN), half.share(ABOVE)) == (0.5, 0.25, 0.25)
