"""Losses against a plain-Python reference (explicit softmax, log and sums; no torch maths)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from erde.config.methods import METHOD_TABLE, MethodKey, methods, register_method
from erde.distill.losses import LossResult, make_loss, pair_exits
from erde.errors import ErdeError

METHODS = methods()  # erde's own: teacher, ce, kd, kd-masked, erde, self-kd
# 3 samples, 3 classes, 2 exits. Labels 0, 1, 2.
LABELS = [0, 1, 2]
STUDENT = [
    [[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [1.5, -0.5, 0.0]],
    [[3.0, -1.0, 0.0], [-0.5, 2.0, 0.5], [0.0, 1.0, 1.2]],
]
# Teacher exit 0: right on samples 0 and 1, wrong on 2 (argmax 0).
# Teacher exit 1: right on samples 0 and 2, wrong on 1 (argmax 2).
TEACHER = [
    [[1.0, 0.2, 0.1], [0.0, 1.5, -0.5], [2.0, 0.0, 1.0]],
    [[4.0, 0.0, -2.0], [0.0, 1.0, 3.0], [-1.0, 0.5, 2.5]],
]
# Teacher right on every sample at both exits.
TEACHER_RIGHT = [
    [[3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.5, 1.0]],
    [[1.0, 0.0, -1.0], [0.0, 4.0, 0.0], [-1.0, 0.0, 2.0]],
]


def softmax(row, temp=1.0):
    z = [v / temp for v in row]
    top = max(z)
    e = [math.exp(v - top) for v in z]
    total = sum(e)
    return [v / total for v in e]


def ref_ce(row, y):
    return -math.log(softmax(row)[y])


def ref_kl(t_row, s_row, temp):
    p, q = softmax(t_row, temp), softmax(s_row, temp)
    return temp * temp * sum(pk * math.log(pk / qk) for pk, qk in zip(p, q, strict=True))


def ref_entropy(row, kind):
    p = softmax(row)
    if kind == "uniform-ce":
        return -sum(math.log(pk) for pk in p) / len(p)
    return sum(pk * math.log(pk) for pk in p)


def reference(
    method,
    student,
    labels,
    teacher=None,
    *,
    alpha=0.5,
    beta=1.0,
    temp=4.0,
    weights=None,
    pairing=None,
    entropy_term="uniform-ce",
    entropy_exits="all",
):
    """Second, independent implementation of docs/method.md ("Losses"), per sample and per exit."""
    n_exits = len(student)
    weights = weights or [1.0] * n_exits
    pairing = pairing or list(range(n_exits))
    if method in ("teacher", "ce"):
        alpha = 1.0
    if method != "erde":
        beta = 0.0
    comps = {"ce": 0.0, "kl": 0.0, "entropy": 0.0}
    for i in range(n_exits):
        ce = kl = ent = wrong = 0.0
        last = i == n_exits - 1
        # self-kd: the earlier exits mix labels and the last exit's softened output; the last
        # exit learns from the labels alone.
        ce_scale = 1.0 if method == "self-kd" and last else alpha
        for n, y in enumerate(labels):
            s_row = student[i][n]
            ce += ref_ce(s_row, y)
            if method == "self-kd" and not last:
                kl += ref_kl(student[-1][n], s_row, temp)
            if method in ("kd", "kd-masked", "erde", "static"):  # static: kd, on a plain net
                t_row = teacher[pairing[i]][n]
                right = 1.0 if t_row.index(max(t_row)) == y else 0.0
                wrong += 1.0 - right
                mask = 1.0 if method in ("kd", "static") else right
                kl += mask * ref_kl(t_row, s_row, temp)
                if method == "erde" and not (entropy_exits == "intermediate" and last):
                    ent += (1.0 - right) * ref_entropy(s_row, entropy_term)
        n = len(labels)
        comps[f"ce/{i + 1}"], comps[f"kl/{i + 1}"], comps[f"entropy/{i + 1}"] = (
            ce / n,
            kl / n,
            ent / n,
        )
        comps[f"teacher_wrong/{i + 1}"] = wrong / n
        comps["ce"] += weights[i] * ce_scale * ce / n
        comps["kl"] += weights[i] * (1 - alpha) * kl / n
        comps["entropy"] += weights[i] * beta * ent / n
    return comps["ce"] + comps["kl"] + comps["entropy"], comps


def tensors(nested, dtype=torch.float64, requires_grad=False):
    return [torch.tensor(x, dtype=dtype, requires_grad=requires_grad) for x in nested]


def run(method, student=STUDENT, teacher=TEACHER, labels=LABELS, **kwargs):
    kwargs.setdefault("beta", 1.0)  # the hand-worked references weigh the entropy term by 1
    loss = make_loss(method, num_exits=len(student), **kwargs)
    return loss(tensors(student), torch.tensor(labels), tensors(teacher))


def assert_matches(result, expected_total, expected_comps):
    assert isinstance(result, LossResult)
    assert result.total.item() == pytest.approx(expected_total, rel=1e-9, abs=1e-12)
    assert set(result.components) == set(expected_comps)
    for key, value in expected_comps.items():
        assert result.components[key].item() == pytest.approx(value, rel=1e-9, abs=1e-12), key


CONFIGS = [
    {},
    {"alpha": 0.3, "beta": 2.0, "temperature": 2.0},
    {"alpha": 0.0, "temperature": 1.0},
    {"entropy_term": "neg-entropy"},
    {"entropy_exits": "intermediate"},
    {"exit_weights": [2.0, 0.5]},
    {"pairing": [1, 1]},
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "defaults")
def test_every_method_matches_reference(method, config):
    ref_kwargs = {
        "alpha": config.get("alpha", 0.5),
        "beta": config.get("beta", 1.0),
        "temp": config.get("temperature", 4.0),
        "weights": config.get("exit_weights"),
        "pairing": config.get("pairing"),
        "entropy_term": config.get("entropy_term", "uniform-ce"),
        "entropy_exits": config.get("entropy_exits", "all"),
    }
    total, comps = reference(method, STUDENT, LABELS, TEACHER, **ref_kwargs)
    assert_matches(run(method, **config), total, comps)


def test_hand_computed_values_at_uniform_logits():
    # All-zero logits: CE = log 3, KL = 0 (student == teacher), uniform-ce = log 3.
    zeros = [[[0.0] * 3] * 3] * 2
    # argmax of zeros is class 0: the teacher is right on sample 0 only -> c = [1, 0, 0].
    result = run("erde", student=zeros, teacher=zeros, labels=[0, 1, 2])
    log3 = math.log(3)
    # Per exit: 0.5 * log3 + 0 + 1.0 * (2/3) * log3; two exits.
    assert result.total.item() == pytest.approx(2 * (0.5 * log3 + 2 / 3 * log3))
    assert result.components["teacher_wrong/1"].item() == pytest.approx(2 / 3)
    assert result.components["kl/2"].item() == pytest.approx(0.0, abs=1e-12)


def test_self_kd_distils_the_earlier_exits_from_the_detached_last_exit():
    """No teacher: exit 1 mixes its labels (alpha) with the last exit's softened output, the
    last exit learns from its labels alone; the target is detached, so the last exit's gradient
    is that of its own cross-entropy."""
    student, labels = tensors(STUDENT, requires_grad=True), torch.tensor(LABELS)
    loss = make_loss("self-kd", num_exits=2, alpha=0.3, temperature=2.0)
    assert not loss.needs_teacher
    result = loss(student, labels)
    ce = [sum(ref_ce(STUDENT[i][n], y) for n, y in enumerate(LABELS)) / 3 for i in (0, 1)]
    kl = sum(ref_kl(STUDENT[1][n], STUDENT[0][n], 2.0) for n in range(3)) / 3
    assert result.total.item() == pytest.approx(0.3 * ce[0] + 0.7 * kl + ce[1], rel=1e-12)
    assert result.components["kl/1"].item() == pytest.approx(kl, rel=1e-12)
    assert result.components["kl/2"].item() == 0.0
    result.total.backward()
    last = torch.tensor(STUDENT[1], dtype=torch.float64, requires_grad=True)
    torch.nn.functional.cross_entropy(last, labels).backward()
    torch.testing.assert_close(student[1].grad, last.grad, rtol=1e-12, atol=1e-15)


def test_teacher_mask_follows_pairing():
    default = run("kd-masked")
    # Exit 1 pairs teacher exit 1 (wrong on sample 2), exit 2 teacher exit 2 (wrong on sample 1).
    assert default.components["teacher_wrong/1"].item() == pytest.approx(1 / 3)
    assert default.components["teacher_wrong/2"].item() == pytest.approx(1 / 3)
    masked_kl = sum(ref_kl(TEACHER[0][n], STUDENT[0][n], 4.0) for n in (0, 1)) / 3
    assert default.components["kl/1"].item() == pytest.approx(masked_kl, rel=1e-9)

    final = run("kd-masked", pairing=[1, 1])
    # Exit 1 now learns from teacher exit 2 (pairing is 0-based): masked on sample 1, not 2.
    kl_from_final = sum(ref_kl(TEACHER[1][n], STUDENT[0][n], 4.0) for n in (0, 2)) / 3
    assert final.components["kl/1"].item() == pytest.approx(kl_from_final, rel=1e-9)


def test_teacher_always_wrong_masks_all_distillation():
    wrong_teacher = [[[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]]] * 2
    result = run("erde", teacher=wrong_teacher)
    assert result.components["kl"].item() == 0.0
    assert result.components["teacher_wrong/1"].item() == 1.0
    expected_entropy = (
        sum(ref_entropy(STUDENT[i][n], "uniform-ce") for i in range(2) for n in range(3)) / 3
    )
    assert result.components["entropy"].item() == pytest.approx(expected_entropy, rel=1e-9)


def test_erde_with_beta_zero_equals_kd_masked():
    erde = run("erde", beta=0.0)
    masked = run("kd-masked")
    assert erde.total.item() == pytest.approx(masked.total.item(), rel=1e-12)
    assert erde.components["entropy"].item() == 0.0


def test_kd_ignores_the_mask():
    # Teacher right everywhere: the mask removes nothing.
    assert run("kd", teacher=TEACHER_RIGHT).total.item() == pytest.approx(
        run("kd-masked", teacher=TEACHER_RIGHT).total.item(), rel=1e-12
    )
    # Teacher wrong on some samples: kd still distils them, kd-masked does not.
    kd, masked = run("kd"), run("kd-masked")
    unmasked_kl = sum(ref_kl(TEACHER[0][n], STUDENT[0][n], 4.0) for n in range(3)) / 3
    assert kd.components["kl/1"].item() == pytest.approx(unmasked_kl, rel=1e-9)
    assert kd.total.item() > masked.total.item() + 1e-3


def test_ce_and_teacher_need_no_teacher_and_force_alpha_one():
    student = tensors(STUDENT)
    labels = torch.tensor(LABELS)
    expected = sum(ref_ce(STUDENT[i][n], LABELS[n]) for i in range(2) for n in range(3)) / 3
    for method in ("ce", "teacher"):
        result = make_loss(method, alpha=0.2, num_exits=2)(student, labels)
        assert result.total.item() == pytest.approx(expected, rel=1e-9)
        assert result.components["kl"].item() == 0.0
        assert result.components["teacher_wrong/2"].item() == 0.0


@pytest.mark.parametrize(
    "kind, at_uniform", [("uniform-ce", math.log(5)), ("neg-entropy", -math.log(5))]
)
def test_entropy_term_is_minimal_at_uniform(kind, at_uniform):
    # alpha = 1 and a teacher wrong everywhere: the total is CE + the entropy term alone.
    loss = make_loss("erde", alpha=1.0, entropy_term=kind, num_exits=1)
    labels = torch.tensor([0])
    always_wrong = [torch.tensor([[0.0, 9.0, 0.0, 0.0, 0.0]], dtype=torch.float64)]
    uniform = torch.zeros(1, 5, dtype=torch.float64, requires_grad=True)
    result = loss([uniform], labels, always_wrong)
    assert result.components["entropy/1"].item() == pytest.approx(at_uniform, rel=1e-12)
    # Stationary at the uniform output: the gradient left after CE's (p - onehot) is zero.
    grad = torch.autograd.grad(result.total, uniform)[0][0].tolist()
    ce_grad = [0.2 - 1.0, 0.2, 0.2, 0.2, 0.2]
    assert [g - c for g, c in zip(grad, ce_grad, strict=True)] == pytest.approx(
        [0.0] * 5, abs=1e-12
    )
    rng = np.random.default_rng(0)
    for _ in range(20):
        row = rng.normal(0, 3, size=5).tolist()
        value = loss(tensors([[row]]), labels, always_wrong).components["entropy/1"].item()
        assert value > at_uniform
        assert value == pytest.approx(ref_entropy(row, kind), rel=1e-9)


def test_kl_scales_with_temperature_squared():
    s_row, t_row = STUDENT[1][0], TEACHER_RIGHT[1][0]
    for temp in (1.0, 2.0, 4.0):
        # Manual KL without the helper: sum p log p - sum p log q at softened distributions.
        z_t = [math.exp(v / temp) for v in t_row]
        z_s = [math.exp(v / temp) for v in s_row]
        p = [v / sum(z_t) for v in z_t]
        q = [v / sum(z_s) for v in z_s]
        manual = sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q, strict=True))
        loss = make_loss("kd", alpha=0.0, temperature=temp, num_exits=1)
        result = loss(tensors([[s_row]]), torch.tensor([0]), tensors([[t_row]]))
        assert result.components["kl/1"].item() == pytest.approx(temp**2 * manual, rel=1e-9)
        assert result.total.item() == pytest.approx(temp**2 * manual, rel=1e-9)


def test_exit_weights_scale_each_exit():
    unit = run("erde")
    weighted = run("erde", exit_weights=[2.0, 0.0])
    per_exit0 = sum(
        unit.components[k].item() * s for k, s in (("ce/1", 0.5), ("kl/1", 0.5), ("entropy/1", 1.0))
    )
    assert weighted.total.item() == pytest.approx(2.0 * per_exit0, rel=1e-9)


def test_intermediate_entropy_skips_the_last_exit():
    everywhere = run("erde")
    intermediate = run("erde", entropy_exits="intermediate")
    assert everywhere.components["entropy/2"].item() > 0.0
    assert intermediate.components["entropy/2"].item() == 0.0
    assert intermediate.components["entropy/1"].item() == pytest.approx(
        everywhere.components["entropy/1"].item(), rel=1e-12
    )
    # Teacher exit 1 is wrong on sample 1 only.
    expected_gap = ref_entropy(STUDENT[1][1], "uniform-ce") / 3
    gap = everywhere.total.item() - intermediate.total.item()
    assert gap == pytest.approx(expected_gap, rel=1e-9)


def test_pair_exits_same():
    assert pair_exits([0.3, 1.0], [0.8, 1.0], "same") == [0, 1]
    with pytest.raises(ErdeError, match="depth"):
        pair_exits([0.3, 0.6, 1.0], [0.5, 1.0], "same")


def test_pair_exits_depth():
    teacher = [0.1, 0.25, 0.5, 0.75, 1.0]
    # 0.3 -> 0.25 (index 1); 0.6 -> 0.5 (index 2, 0.1 away vs 0.15); last -> last.
    assert pair_exits([0.3, 0.6, 1.0], teacher, "depth") == [1, 2, 4]
    # Tie at 0.5 between 0.25 and 0.75: the deeper teacher exit wins.
    assert pair_exits([0.5, 1.0], [0.25, 0.75, 1.0], "depth") == [1, 2]
    # Equal counts still pair by fraction, not by index.
    assert pair_exits([0.1, 0.2, 1.0], [0.1, 0.6, 1.0], "depth") == [0, 0, 2]
    # The student's last exit pairs with the teacher's last even when another is closer.
    assert pair_exits([0.4, 0.5], [0.5, 1.0], "depth") == [0, 1]
    # A single-exit teacher: everything pairs with it.
    assert pair_exits([0.2, 0.7, 1.0], [1.0], "depth") == [0, 0, 0]


def test_pair_exits_final():
    assert pair_exits([0.2, 0.5, 1.0], [0.5, 1.0], "final") == [1, 1, 1]


def test_pair_exits_refusals_say_what_to_do():
    with pytest.raises(ErdeError) as err:
        pair_exits([0.3, 0.6, 1.0], [0.5, 1.0], "same")
    assert str(err.value) == (
        "exit pairing 'same' needs as many student exits (3) as teacher exits (2); use pairing "
        "'depth' (closest relative depth) or 'final' (every student exit learns from the "
        "teacher's last exit)"
    )
    for student, teacher in (([], [1.0]), ([1.0], [])):
        with pytest.raises(ErdeError) as err:
            pair_exits(student, teacher, "depth")
        assert str(err.value) == (
            "exit pairing needs at least one student exit and one teacher exit; "
            "check that both models define their exits"
        )


@pytest.mark.parametrize(
    "student, teacher, mode",
    [([0.5, 1.0], [0.5, 1.0], "nearest"), ([], [1.0], "depth"), ([1.0], [], "final")],
)
def test_pair_exits_rejects_bad_input(student, teacher, mode):
    with pytest.raises(ErdeError):
        pair_exits(student, teacher, mode)


@pytest.mark.parametrize("method", ["kd", "kd-masked", "erde"])
def test_gradients_reach_only_the_student(method):
    student = tensors(STUDENT, requires_grad=True)
    teacher = tensors(TEACHER, requires_grad=True)
    result = make_loss(method, num_exits=2)(student, torch.tensor(LABELS), teacher)
    result.total.backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(not c.requires_grad for c in result.components.values())


@pytest.mark.parametrize("method", METHODS)
def test_extreme_logits_stay_finite(method):
    big = [[[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4], [1e4, 0.0, -1e4]]] * 2
    student = tensors(big, dtype=torch.float32, requires_grad=True)
    teacher = tensors([[row[::-1] for row in ex] for ex in big], dtype=torch.float32)
    result = make_loss(method, num_exits=2)(student, torch.tensor(LABELS), teacher)
    result.total.backward()
    assert torch.isfinite(result.total)
    assert all(torch.isfinite(c) for c in result.components.values())
    assert all(torch.isfinite(s.grad).all() for s in student)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_is_computed_in_float32(method, dtype):
    student = tensors(STUDENT, dtype=dtype)
    teacher = tensors(TEACHER, dtype=dtype)
    result = make_loss(method, num_exits=2, beta=1.0)(student, torch.tensor(LABELS), teacher)
    assert result.total.dtype == torch.float32
    # Same inputs rounded to half, then evaluated exactly by the reference.
    rounded_s = [s.double().tolist() for s in student]
    rounded_t = [t.double().tolist() for t in teacher]
    expected, _ = reference(method, rounded_s, LABELS, rounded_t)
    assert result.total.item() == pytest.approx(expected, rel=1e-5)
    big = tensors([[[6e4, -6e4, 0.0]] * 3] * 2, dtype=torch.float16)
    assert torch.isfinite(make_loss(method, num_exits=2)(big, torch.tensor(LABELS), big).total)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "hinton"},
        {"alpha": -0.1},
        {"alpha": 1.5},
        {"alpha": float("nan")},
        {"beta": -1.0},
        {"beta": float("inf")},
        {"temperature": 0.0},
        {"temperature": -2.0},
        {"entropy_term": "max-entropy"},
        {"entropy_exits": "last"},
        {"exit_weights": [1.0]},
        {"exit_weights": [1.0, -1.0]},
        {"pairing": [0]},
        {"pairing": [0, -1]},
        {"num_exits": 0},
    ],
    ids=repr,
)
def test_bad_arguments_raise(kwargs):
    args = {"method": "erde", "num_exits": 2, **kwargs}
    method = args.pop("method")
    with pytest.raises(ErdeError):
        make_loss(method, **args)


def test_bad_calls_raise():
    student, labels, teacher = tensors(STUDENT), torch.tensor(LABELS), tensors(TEACHER)
    for method in ("kd", "kd-masked", "erde"):
        with pytest.raises(ErdeError, match="teacher"):
            make_loss(method, num_exits=2)(student, labels, None)
    with pytest.raises(ErdeError, match="exits"):
        make_loss("ce", num_exits=3)(student, labels)
    with pytest.raises(ErdeError, match="depth"):
        make_loss("kd", num_exits=2)(student, labels, teacher[:1])
    with pytest.raises(ErdeError, match="pair_exits"):
        make_loss("kd", pairing=[0, 2], num_exits=2)(student, labels, teacher)
    four_classes = [torch.zeros(3, 4, dtype=torch.float64)] * 2
    with pytest.raises(ErdeError, match="same dataset"):
        make_loss("erde", num_exits=2)(student, labels, four_classes)


def test_a_wrong_teacher_shape_names_the_exits_from_1():
    student, labels = tensors(STUDENT), torch.tensor(LABELS)
    teacher = [torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)]
    with pytest.raises(ErdeError) as caught:
        make_loss("kd", num_exits=2, pairing=[1, 1])(student, labels, teacher)
    assert "teacher exit 2 gives logits of shape (3, 4) but student exit 1 (3, 3)" in str(
        caught.value
    )


def test_an_own_term_gets_its_context_and_adds_alone(monkeypatch):
    """A method with no erde term: the total is the exit-weighted mean of its own values, each
    exit's call sees that exit's number, the exit count, alpha, T, its keys with defaults filled
    and the student's detached last exit, and no cross-entropy creeps in."""
    monkeypatch.setattr("erde.config.methods.METHOD_TABLE", dict(METHOD_TABLE))
    seen = []

    def own(s, labels, t, ctx):
        seen.append((ctx, s.detach().clone(), labels, t))
        return (ctx.exit + 1) * 10.0 + ctx.num_exits + s[:, 0] * ctx.options["w"]

    register_method(
        "own-only",
        terms=(),
        loss=own,
        teacher=True,
        keys={"w": MethodKey(0.5, "weight"), "u": MethodKey(3.0, "unused")},
    )
    student, labels, teacher = tensors(STUDENT), torch.tensor(LABELS), tensors(TEACHER)
    loss = make_loss(
        "own-only",
        num_exits=2,
        alpha=0.3,
        temperature=2.5,
        exit_weights=[1.0, 2.0],
        options={"w": 4},
    )
    result = loss(student, labels, teacher)
    per_exit = [
        [10 + 2 + 4 * row[0] for row in STUDENT[0]],
        [20 + 2 + 4 * row[0] for row in STUDENT[1]],
    ]
    want = sum(w * sum(v) / 3 for w, v in zip([1.0, 2.0], per_exit, strict=True))
    assert result.total.item() == pytest.approx(want, rel=1e-12)
    assert result.components["own"].item() == pytest.approx(want, rel=1e-12)
    assert result.components["ce"].item() == 0.0
    assert [c.exit for c, *_ in seen] == [0, 1]
    for (ctx, s, got_labels, t), i in zip(seen, range(2), strict=True):
        assert (ctx.num_exits, ctx.alpha, ctx.temperature) == (2, 0.3, 2.5)
        assert dict(ctx.options) == {"w": 4.0, "u": 3.0}
        assert torch.equal(ctx.final, student[1]) and not ctx.final.requires_grad
        assert torch.equal(s, student[i]) and torch.equal(got_labels, labels)
        assert torch.equal(t, teacher[i])


@settings(max_examples=60, deadline=None)
@given(
    logits=hnp.arrays(
        np.float64, (2, 2, 4, 5), elements=st.floats(-30, 30, allow_nan=False, width=32)
    ),
    labels=hnp.arrays(np.int64, 4, elements=st.integers(0, 4)),
    method=st.sampled_from(METHODS),
    alpha=st.floats(0, 1),
    beta=st.floats(0, 5),
    temperature=st.floats(0.5, 8),
    weights=st.lists(st.floats(0, 3), min_size=2, max_size=2),
)
def test_property_totals_are_finite_nonnegative_and_consistent(
    logits, labels, method, alpha, beta, temperature, weights
):
    student, teacher = [torch.from_numpy(x) for x in logits[0]], list(torch.from_numpy(logits[1]))
    loss = make_loss(
        method, alpha=alpha, beta=beta, temperature=temperature, exit_weights=weights, num_exits=2
    )
    result = loss(student, torch.from_numpy(labels), teacher)
    total = result.total.item()
    comps = {k: v.item() for k, v in result.components.items()}
    assert math.isfinite(total)
    assert total >= 0.0
    assert total == pytest.approx(comps["ce"] + comps["kl"] + comps["entropy"], rel=1e-9, abs=1e-9)
    scale = {"ce": alpha, "kl": 1 - alpha, "entropy": beta}
    if method in ("teacher", "ce"):
        scale = {"ce": 1.0, "kl": 0.0, "entropy": 0.0}
    elif method != "erde":
        scale["entropy"] = 0.0
    for key, factor in scale.items():
        # self-kd: the last exit learns from the labels alone (weight 1, not alpha).
        factors = [factor, 1.0 if method == "self-kd" and key == "ce" else factor]
        per_exit = sum(
            w * f * comps[f"{key}/{i}"]
            for i, (w, f) in enumerate(zip(weights, factors, strict=True), start=1)
        )
        assert comps[key] == pytest.approx(per_exit, rel=1e-9, abs=1e-9)


def test_an_own_term_of_the_wrong_shape_names_the_method_and_the_exit(monkeypatch):
    monkeypatch.setattr("erde.config.methods.METHOD_TABLE", dict(METHOD_TABLE))
    register_method("own-bad", terms=("ce",), loss=lambda s, labels, t, ctx: s[:, :1] * ctx.exit)
    with pytest.raises(ErdeError) as caught:
        make_loss("own-bad", num_exits=2)(tensors(STUDENT), torch.tensor(LABELS))
    assert str(caught.value) == (
        "method 'own-bad': its loss gave (3, 1) at exit 1; it must return one value per image "
        "(shape (3,)): fix the plugin's loss function"
    )
