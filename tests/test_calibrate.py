import math

import numpy as np
import pytest
import torch

from erde.errors import ErdeError
from erde.evaluation.cache import LogitsCache
from erde.evaluation.calibrate import (
    apply,
    calibrate_for_accuracy,
    calibrate_for_budget,
    resolve_budget,
)
from erde.evaluation.summary import summarize
from erde.evaluation.sweep import Curve, sweep
from erde.run.model_info import DataInfo, ModelInfo
from erde.run.report import Reference

K = 4
EXIT_MACS = [10.0, 20.0, 40.0]
LABELS = torch.tensor([0, 1, 2, 3, 1, 2, 3, 1])
GRID = [0.0, 0.5, 100.0]  # full model / the known middle point / always the first exit


def confident(cls: int) -> list[float]:
    row = [0.0] * K
    row[cls] = 20.0
    return row


def known_logits() -> torch.Tensor:
    """Exit 0 confident+right on images 0-3, flat on 4-7; exit 1 confident+right on 0-5,
    confidently wrong on 6, flat on 7; exit 2 confident+right everywhere. Against LABELS:
    theta 0 -> accuracy 1, 40 MACs; theta 0.5 -> 7/8, 17.5 MACs; theta 100 -> 1/2, 10 MACs."""
    flat = [0.0] * K
    e0 = [confident(int(y)) for y in LABELS[:4]] + [flat] * 4
    e1 = [confident(int(y)) for y in LABELS[:6]] + [confident(0), flat]
    e2 = [confident(int(y)) for y in LABELS]
    return torch.tensor([e0, e1, e2]).permute(1, 0, 2).contiguous()


def hand_curve(thresholds, macs, accuracy) -> Curve:
    """A two-exit validation curve (exits at 10 and 40 MACs) with consistent exit shares."""
    macs = np.asarray(macs, dtype=float)
    late = (macs - 10.0) / 30.0
    return Curve(
        thresholds=np.asarray(thresholds, dtype=float),
        accuracy=np.asarray(accuracy, dtype=float),
        expected_macs=macs,
        exit_share=np.stack([1 - late, late], axis=1),
        exit_macs=np.array([10.0, 40.0]),
    )


VAL = hand_curve(
    thresholds=[0.0, 0.2, 0.3, 0.4, 0.6, 0.8],
    macs=[40, 32, 30, 25, 20, 10],
    accuracy=[0.90, 0.90, 0.90, 0.88, 0.80, 0.60],
)


def test_budget_picks_best_accuracy_within_budget():
    chosen = calibrate_for_budget(VAL, 24.0)
    assert (chosen.threshold, chosen.val_accuracy, chosen.val_expected_macs) == (0.6, 0.80, 20.0)
    assert "val" in chosen.criterion and "<= 2.4e-05 M per image" in chosen.criterion
    # 0.90 is reached at 32 and at 30 MACs: the cheaper one wins
    chosen = calibrate_for_budget(VAL, 35.0)
    assert (chosen.threshold, chosen.val_expected_macs) == (0.3, 30.0)
    assert calibrate_for_budget(VAL, 40.0).threshold == 0.3
    assert calibrate_for_budget(VAL, 10.0).threshold == 0.8


@pytest.mark.parametrize("budget", [9.0, 41.0, math.nan])
def test_budget_outside_model_range(budget):
    with pytest.raises(ErdeError, match=r"1e-05 M to 4e-05 M MACs"):
        calibrate_for_budget(VAL, budget)


def test_accuracy_target_picks_fewest_macs():
    chosen = calibrate_for_accuracy(VAL, 0.88)
    assert (chosen.threshold, chosen.val_accuracy, chosen.val_expected_macs) == (0.4, 0.88, 25.0)
    assert calibrate_for_accuracy(VAL, 0.89).threshold == 0.3
    assert calibrate_for_accuracy(VAL, 0.0).threshold == 0.8


def test_unreachable_accuracy_falls_back_to_full_model():
    chosen = calibrate_for_accuracy(VAL, 0.95)
    assert (chosen.threshold, chosen.val_accuracy, chosen.val_expected_macs) == (0.0, 0.90, 40.0)
    assert "not reached" in chosen.criterion and "full model" in chosen.criterion
    assert not chosen.reached and calibrate_for_accuracy(VAL, 0.9).reached
    no_full_point = hand_curve([0.5, 0.8], [25, 10], [0.88, 0.60])
    with pytest.raises(ErdeError, match="threshold 0"):
        calibrate_for_accuracy(no_full_point, 0.95)


@pytest.mark.parametrize(("target", "match"), [(93.0, "did you mean 0.93"), (-0.1, r"\[0, 1\]")])
def test_bad_accuracy_target(target, match):
    with pytest.raises(ErdeError, match=match):
        calibrate_for_accuracy(VAL, target)


def test_test_data_never_moves_a_chosen_threshold():
    """Through the whole summary: other test logits and labels change the reported test numbers,
    never a threshold, because every threshold is chosen on the validation split alone."""
    val = known_logits()
    data = DataInfo("digits", list("abcd"), [0.5], [0.25], 8, 1)
    info = ModelInfo({"name": "resnet8"}, [10, 20, 40], 40, data)
    g = torch.Generator().manual_seed(0)
    tests = [(val, LABELS), (torch.randn(30, 3, K, generator=g) * 5, torch.arange(30) % K)]
    reports = [
        summarize(
            LogitsCache({"val": val, "test": x}, {"val": LABELS, "test": y}, EXIT_MACS, ""),
            info,
            "run",
            budget=0.5,
        ).report
        for x, y in tests
    ]

    def thresholds(r):
        budgets = [p.threshold for p in r.at_budget_fraction.values() if p is not None]
        own = [r.at_reference_accuracy, r.at_own_full_accuracy, r.chosen]
        return [p.threshold for p in own] + budgets

    assert thresholds(reports[0]) == thresholds(reports[1])
    assert min(thresholds(reports[0])) == 0.0 < max(thresholds(reports[0]))  # full model, early
    assert reports[0].chosen.test_accuracy != reports[1].chosen.test_accuracy


def test_test_labels_never_move_the_threshold_but_val_labels_can():
    logits = known_logits()
    val_curve = sweep(logits, LABELS, EXIT_MACS, GRID)
    chosen = calibrate_for_accuracy(val_curve, 0.85)
    assert chosen.threshold == 0.5  # 7/8 >= 0.85 at 17.5 MACs

    other_test_labels = LABELS.clone()
    other_test_labels[:4] = (other_test_labels[:4] + 1) % K
    first = apply(logits, LABELS, EXIT_MACS, chosen)
    second = apply(logits, other_test_labels, EXIT_MACS, chosen)
    assert first.threshold == second.threshold == 0.5
    assert (first.test_accuracy, second.test_accuracy) == (7 / 8, 3 / 8)

    # image 0 relabelled: the early exit is now wrong there (6/8 < 0.85), the full model is not
    # (its last exit still says 0, so 7/8): the choice moves to threshold 0
    other_val_labels = LABELS.clone()
    other_val_labels[0] = 1
    moved = calibrate_for_accuracy(sweep(logits, other_val_labels, EXIT_MACS, GRID), 0.85)
    assert (moved.threshold, moved.val_accuracy, moved.val_expected_macs) == (0.0, 7 / 8, 40.0)


def test_apply_reports_the_test_split():
    val_curve = sweep(known_logits(), LABELS, EXIT_MACS, GRID)
    chosen = calibrate_for_budget(val_curve, 20.0)
    result = apply(known_logits(), LABELS, EXIT_MACS, chosen)
    assert result.threshold == 0.5
    assert result.test_accuracy == 7 / 8
    assert result.test_expected_macs == pytest.approx(17.5)
    assert result.test_exit_share == [0.5, 0.375, 0.125]
    assert result.reduction_vs_own_full == result.reduction_vs_reference == pytest.approx(40 / 17.5)
    against = apply(known_logits(), LABELS, EXIT_MACS, chosen, reference_macs=70.0)
    assert against.reduction_vs_reference == pytest.approx(4.0)


def test_apply_with_maxprob_policy():
    # 1 - p_max is ~6e-9 on confident exits and 0.75 on flat ones
    val_curve = sweep(known_logits(), LABELS, EXIT_MACS, [0.0, 0.1, 1.0], policy="maxprob")
    chosen = calibrate_for_budget(val_curve, 20.0)
    result = apply(known_logits(), LABELS, EXIT_MACS, chosen, policy="maxprob")
    assert chosen.threshold == pytest.approx(0.1)
    assert result.test_exit_share == [0.5, 0.375, 0.125]


def test_resolve_budget():
    assert resolve_budget(0.5, 40.0) == 20.0
    assert resolve_budget(1.0, 40.0) == 40.0
    assert resolve_budget(25.0, 40.0) == 25.0
    for value in (0.0, -1.0, math.nan):
        with pytest.raises(ErdeError, match="positive"):
            resolve_budget(value, 40.0)
    with pytest.raises(ErdeError, match="exceeds the full model"):
        resolve_budget(50.0, 40.0)


def test_the_accuracy_target_is_met_on_val_and_then_applied_to_a_different_test_split():
    """Val is `known_logits`: the target 7/8 (own final exit 1.0 - 12.5 pt) is first met at
    theta = log 4 (the flat rows' entropy, a tie: they stay), 17.5 MACs. The test split differs:
    every exit 0 is flat but right (argmax of a flat row is class 0) and exits 1-2 are sure, so
    on test alone the cheapest point would be 'everyone at exit 0' (10 MACs, theta > log 4).
    At the val threshold the test images all go on to exit 1: 20 MACs, accuracy 1."""
    val = known_logits()
    test = torch.zeros(6, 3, K)
    test[:, 1:, 0] = 20.0
    data = DataInfo("digits", list("abcd"), [0.5], [0.25], 8, 1)
    info = ModelInfo({"name": "resnet8"}, [10, 20, 40], 40, data)
    cache = LogitsCache(
        {"val": val, "test": test}, {"val": LABELS, "test": torch.zeros(6, dtype=torch.long)},
        EXIT_MACS, "",
    )  # fmt: skip
    report = summarize(cache, info, "run", max_drop=12.5).report
    for point in (report.at_reference_accuracy, report.at_own_full_accuracy, report.chosen):
        assert point.threshold == pytest.approx(math.log(K), rel=1e-6)
        assert (point.val_accuracy, point.val_expected_macs) == (7 / 8, 17.5)
        assert (point.test_accuracy, point.test_expected_macs) == (1.0, 20.0)
        assert point.test_exit_share == [0.0, 1.0, 0.0]
    # A reference of 80 MACs: the reduction is against it. A budget of half the full model's
    # 40 MACs: 17.5 val MACs at theta log 4 is the most accurate point within 20.
    teacher = Reference("teacher", 1.0, 1.0, 80.0)
    other = summarize(cache, info, "run", max_drop=12.5, reference=teacher, budget=0.5).report
    kept, within = other.at_reference_accuracy, other.chosen
    for point in (kept, within):
        assert point.threshold == pytest.approx(math.log(K), rel=1e-6)
        assert (point.val_expected_macs, point.test_expected_macs) == (17.5, 20.0)
        assert (point.reduction_vs_reference, point.reduction_vs_own_full) == (4.0, 2.0)
    # without the drop the target (val accuracy 1.0) is met on val only by the full model
    full = summarize(cache, info, "run").report.chosen
    assert (full.threshold, full.val_accuracy, full.test_expected_macs) == (0.0, 1.0, 40.0)


def test_a_budget_between_the_middle_and_last_exit_is_in_range():
    """Three exits (10, 20, 40 MACs): 30 MACs lies inside the model's range; 7/8 at 17.5 MACs is
    the most accurate point within it."""
    chosen = calibrate_for_budget(sweep(known_logits(), LABELS, EXIT_MACS, GRID), 30.0)
    assert (chosen.threshold, chosen.val_accuracy, chosen.val_expected_macs) == (0.5, 7 / 8, 17.5)
    assert chosen.criterion == "highest val accuracy with val expected MACs <= 3e-05 M per image"


def test_a_budget_no_swept_point_meets_is_named():
    full_only = sweep(known_logits(), LABELS, EXIT_MACS, [0.0])  # 40 MACs only
    with pytest.raises(ErdeError) as err:
        calibrate_for_budget(full_only, 15.0)
    assert str(err.value) == (
        "no validation threshold spends at most 1.5e-05 M MACs per image; "
        "sweep with larger thresholds (the default grid includes one)."
    )


def test_equal_macs_prefer_the_more_accurate_point():
    """Two thresholds at 20 MACs: the target is met by both, the more accurate one is chosen."""
    val = hand_curve([0.0, 0.1, 0.2], [40, 20, 20], [0.9, 0.8, 0.85])
    chosen = calibrate_for_accuracy(val, 0.7)
    assert (chosen.threshold, chosen.val_accuracy) == (0.2, 0.85)
    assert chosen.criterion == "fewest val expected MACs with val accuracy >= 70.00 %"
    assert chosen.reached is True


def test_an_unreachable_target_on_three_exits_falls_back_with_its_reason():
    """Image 0 relabelled: the full model is right on 7/8; a target of 1.0 is reached nowhere."""
    labels = LABELS.clone()
    labels[0] = 1
    val = sweep(known_logits(), labels, EXIT_MACS, GRID)
    chosen = calibrate_for_accuracy(val, 1.0)
    assert (chosen.threshold, chosen.val_accuracy, chosen.val_expected_macs) == (0.0, 7 / 8, 40.0)
    assert chosen.reached is False
    assert chosen.criterion == (
        "val accuracy >= 100.00 % is not reached at any threshold; "
        "using the full model (threshold 0)"
    )
    point = apply(known_logits(), labels, EXIT_MACS, chosen)
    assert (point.reached, point.criterion) == (False, chosen.criterion)
    without_zero = sweep(known_logits(), labels, EXIT_MACS, [0.5, 100.0])
    with pytest.raises(ErdeError) as err:
        calibrate_for_accuracy(without_zero, 1.0)
    assert str(err.value) == (
        "the validation curve has no full-model point to fall back to; include threshold 0 "
        "in the sweep (the default grid does)."
    )


@pytest.mark.parametrize(
    ("target", "hint"),
    [(1.5, " (did you mean 0.015?)"), (100.0, " (did you mean 1?)"), (100.5, ""), (-0.5, "")],
)
def test_a_target_outside_0_1_is_refused_with_a_hint_for_percentages(target, hint):
    with pytest.raises(ErdeError) as err:
        calibrate_for_accuracy(VAL, target)
    assert str(err.value) == f"a target accuracy is a fraction in [0, 1]; got {target}{hint}."


def test_one_test_image_is_a_whole_split():
    """A split of one image: it is all of the exit shares, and its accuracy is 0 or 1."""
    chosen = calibrate_for_accuracy(sweep(known_logits(), LABELS, EXIT_MACS, GRID), 0.85)
    point = apply(known_logits()[4:5], LABELS[4:5], EXIT_MACS, chosen)  # leaves at exit 1
    assert (point.test_exit_share, point.test_accuracy) == ([0.0, 1.0, 0.0], 1.0)
    assert (point.test_expected_macs, point.reached) == (20.0, True)
