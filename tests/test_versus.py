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
    assert "erde (1 seeds) against kd (2 seeds) over 2.00-3.00 M MACs" in text
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
