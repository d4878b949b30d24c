"""Training losses: teacher, ce, kd, kd-masked, ERDE, self-kd and the plugins' (docs/method.md,
"Losses").

One engine trains every method; the method only chooses which per-exit terms enter the total (its
registration, `erde.config.methods.register_method`), so a comparison between methods changes
nothing but the loss. A plugin's own term is a function of one exit (`ExitContext`). Arguments
are checked with the config schema's own table (`erde.config.schema.check_value`), so a direct
Python caller gets the message `erde train` gives for the same value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from erde.config.methods import ENTROPY_EXITS, ENTROPY_TERMS, PAIRINGS, check_option, get_method
from erde.config.schema import DistillConfig, check_value
from erde.errors import ErdeError

__all__ = [
    "ENTROPY_EXITS",
    "ENTROPY_TERMS",
    "PAIRINGS",
    "DistillLoss",
    "ExitContext",
    "LossResult",
    "make_loss",
    "pair_exits",
]
_DEFAULTS = DistillConfig()
# Exit fractions are ratios of MAC counts; two distances this close are the same distance.
_TIE_TOLERANCE = 1e-9


def pair_exits(
    student_fractions: Sequence[float], teacher_fractions: Sequence[float], mode: str
) -> list[int]:
    """Index of the teacher exit each student exit learns from.

    Fractions are each exit's cumulative MACs over its own network's total, so networks of different
    size compare by relative depth. `depth` uses the fractions even when both networks have as
    many exits (a student exit at 20% of its compute then learns from the teacher exit nearest
    20%, not from the teacher exit with the same index); ties go to the deeper, more accurate
    teacher exit, and the student's last exit always learns from the teacher's last, the best
    prediction there is.
    """
    check_value("distill.pairing", mode)
    if not student_fractions or not teacher_fractions:
        raise ErdeError(
            "exit pairing needs at least one student exit and one teacher exit; "
            "check that both models define their exits"
        )
    last = len(teacher_fractions) - 1
    if mode == "same":
        if len(student_fractions) != len(teacher_fractions):
            raise ErdeError(
                f"exit pairing 'same' needs as many student exits ({len(student_fractions)}) as "
                f"teacher exits ({len(teacher_fractions)}); use pairing 'depth' (closest relative "
                "depth) or 'final' (every student exit learns from the teacher's last exit)"
            )
        return list(range(len(student_fractions)))
    if mode == "final":
        return [last] * len(student_fractions)
    return [_closest(f, teacher_fractions) for f in student_fractions[:-1]] + [last]


def _closest(fraction: float, teacher_fractions: Sequence[float]) -> int:
    best, best_distance = 0, math.inf
    for j, tf in enumerate(teacher_fractions):
        distance = abs(fraction - tf)
        if distance <= best_distance + _TIE_TOLERANCE:
            best, best_distance = j, min(distance, best_distance)
    return best


@dataclass(frozen=True)
class ExitContext:
    """What a plugin method's own term gets besides the exit's logits, the labels and its paired
    teacher exit's logits: `loss(student, labels, teacher, ctx)` returns one value per image,
    which the total adds weighted by the exit's `distill.exit_weights` alone (the term scales
    itself, reading `alpha` where it wants the label term's complement)."""

    exit: int  # 0-based
    num_exits: int
    alpha: float
    temperature: float
    options: Mapping[str, Any]  # the method's own keys (distill.options), defaults filled in
    final: Tensor  # the student's last exit, detached: a target for self-distillation


@dataclass
class LossResult:
    """The differentiable total plus detached scalars for the log (fixed keys for every method;
    per-exit ones end in the exit's number, 1..n: `ce/1` is the first exit)."""

    total: Tensor
    components: dict[str, Tensor]


class DistillLoss:
    """One method's loss; it holds only constants, so there is nothing to checkpoint.

    Options left out take the config's defaults (`erde.config.schema.DistillConfig`,
    docs/method.md).
    """

    def __init__(
        self,
        method: str,
        *,
        num_exits: int,
        pairing: Sequence[int] | None = None,
        alpha: float = _DEFAULTS.alpha,
        beta: float = _DEFAULTS.beta,
        temperature: float = _DEFAULTS.temperature,
        exit_weights: Sequence[float] | None = _DEFAULTS.exit_weights,
        entropy_term: str = _DEFAULTS.entropy_term,
        entropy_exits: str = _DEFAULTS.entropy_exits,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        given = {
            "method": method,
            "alpha": alpha,
            "beta": beta,
            "temperature": temperature,
            "exit_weights": exit_weights,
            "entropy_term": entropy_term,
            "entropy_exits": entropy_exits,
        }
        for key, value in given.items():
            check_value(f"distill.{key}", value)
        if not (isinstance(num_exits, int) and num_exits >= 1):
            raise ErdeError(f"num_exits must be a positive integer, got {num_exits!r}")
        weights = [1.0] * num_exits if exit_weights is None else [float(w) for w in exit_weights]
        if len(weights) != num_exits:
            raise ErdeError(
                f"exit_weights has {len(weights)} values but the model has {num_exits} exits; "
                "give one weight per exit or leave exit_weights unset (all 1)"
            )
        if pairing is not None:
            pairing = list(pairing)
            if len(pairing) != num_exits or not all(isinstance(j, int) and j >= 0 for j in pairing):
                raise ErdeError(
                    f"pairing must give one teacher exit index (>= 0) per student exit "
                    f"({num_exits}), got {pairing}; build it with erde.distill.losses.pair_exits"
                )
        self.method = method
        self.spec = get_method(method)
        self.options = self._options(options or {})
        # Without soft targets only labels teach; without the entropy term beta weighs nothing.
        self.alpha = float(alpha) if self.spec.distils else 1.0
        self.beta = float(beta) if self.spec.entropy else 0.0
        self.temperature = float(temperature)
        self.exit_weights = weights
        self.entropy_term = entropy_term
        self.entropy_exits = entropy_exits
        self.pairing = pairing
        self.num_exits = num_exits

    def _options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The method's own keys: the given values, checked, over the defaults."""
        own = self.spec.keys
        for name in given:
            if name not in own:
                raise ErdeError(
                    f"options has {name!r}, which method {self.method!r} does not declare; "
                    f"its keys are {', '.join(own) or 'none'}"
                )
        return {
            k: check_option(f"distill.options.{k}", given.get(k, spec.default), spec)
            for k, spec in own.items()
        }

    @property
    def needs_teacher(self) -> bool:
        """Whether calls need teacher logits (so the engine knows to run the teacher)."""
        return self.spec.needs_teacher

    def __call__(
        self,
        student_logits: Sequence[Tensor],
        labels: Tensor,
        teacher_logits: Sequence[Tensor] | None = None,
    ) -> LossResult:
        if len(student_logits) != self.num_exits:
            raise ErdeError(
                f"the model gave {len(student_logits)} exits but the loss was built for "
                f"{self.num_exits}; build the loss with the model's number of exits"
            )
        pairing = self._pairing(student_logits, teacher_logits)
        zero = torch.zeros((), dtype=_compute_dtype(student_logits[0]), device=labels.device)
        components: dict[str, Tensor] = {}
        own = self.spec.loss
        sums = {"ce": zero, "kl": zero, "entropy": zero, **({"own": zero} if own else {})}
        total = zero
        last = len(student_logits) - 1
        final = student_logits[last].detach().to(_compute_dtype(student_logits[last]))
        for i, logits in enumerate(student_logits):
            s = logits.to(_compute_dtype(logits))
            ce = F.cross_entropy(s, labels, reduction="none") if "ce" in self.spec.terms else None
            terms: dict[str, Tensor | None] = {"ce": ce, "kl": None, "entropy": None}
            wrong, t = None, None
            if pairing is not None:
                t = teacher_logits[pairing[i]].detach().to(s.dtype)
                _check_teacher_shape(t, s, i, pairing[i])
                right = (t.argmax(dim=1) == labels).to(s.dtype)
                wrong = 1.0 - right
                if self.spec.kd is not None:
                    kl = self._kl(s, t)
                    terms["kl"] = kl if self.spec.kd == "all" else right * kl
                if self.spec.entropy and self._entropy_on(i):
                    terms["entropy"] = wrong * self._entropy(s)
            # Self-distillation: each earlier exit learns from the last, which learns from labels.
            self_kd = "self-kd" in self.spec.terms
            if self_kd and i < last:
                terms["kl"] = self._kl(s, final)
            ce_scale = 1.0 if self_kd and i == last else self.alpha
            scales = {"ce": ce_scale, "kl": 1.0 - self.alpha, "entropy": self.beta, "own": 1.0}
            if own is not None:
                ctx = ExitContext(
                    i, self.num_exits, self.alpha, self.temperature, self.options, final
                )
                terms["own"] = _own_term(self.method, own(s, labels, t, ctx), s, i)
            for key, per_sample in terms.items():
                mean = zero if per_sample is None else per_sample.mean()
                weighted = self.exit_weights[i] * scales[key] * mean
                total = total + weighted
                sums[key] = sums[key] + weighted.detach()
                components[f"{key}/{i + 1}"] = mean.detach()  # exits 1..n, as metrics.jsonl
            components[f"teacher_wrong/{i + 1}"] = zero if wrong is None else wrong.mean().detach()
        components.update(sums)
        return LossResult(total=total, components=components)

    def _pairing(
        self, student_logits: Sequence[Tensor], teacher_logits: Sequence[Tensor] | None
    ) -> list[int] | None:
        if not self.needs_teacher:
            return None
        if teacher_logits is None:
            raise ErdeError(
                f"method {self.method!r} distils from a teacher but no teacher logits were given; "
                "give a trained teacher, or use method 'ce' to train on labels only"
            )
        pairing = self.pairing
        if pairing is None:
            if len(teacher_logits) != len(student_logits):
                raise ErdeError(
                    f"the teacher has {len(teacher_logits)} exits and the student "
                    f"{len(student_logits)}; pair them with pairing 'depth' or 'final'"
                )
            pairing = list(range(len(student_logits)))
        if max(pairing) >= len(teacher_logits):
            raise ErdeError(
                f"pairing {pairing} names a teacher exit beyond the teacher's "
                f"{len(teacher_logits)} exits; build it with erde.distill.losses.pair_exits"
            )
        return pairing

    def _kl(self, s: Tensor, t: Tensor) -> Tensor:
        """T^2 * KL(softmax(t/T) || softmax(s/T)) per sample; T^2 keeps gradients T-independent."""
        temp = self.temperature
        log_p_teacher = F.log_softmax(t / temp, dim=1)
        log_p_student = F.log_softmax(s / temp, dim=1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True)
        return temp * temp * kl.sum(dim=1)

    def _entropy(self, s: Tensor) -> Tensor:
        """Per-sample term minimised by the uniform output, so the student stays unsure."""
        log_p = F.log_softmax(s, dim=1)
        if self.entropy_term == "uniform-ce":
            return -log_p.mean(dim=1)
        return (log_p.exp() * log_p).sum(dim=1)

    def _entropy_on(self, i: int) -> bool:
        return self.entropy_exits == "all" or i < self.num_exits - 1


# The name the engine and the tests build a loss by: `make_loss("erde", num_exits=3)`.
make_loss = DistillLoss


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """Half-precision logits are upcast: softmax and log in float16 lose too much."""
    return torch.promote_types(logits.dtype, torch.float32)


def _own_term(method: str, value: Any, s: Tensor, i: int) -> Tensor:
    """A plugin term's value, refused unless it is one finite number per image."""
    if not isinstance(value, Tensor) or value.shape != s.shape[:1]:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ErdeError(
            f"method {method!r}: its loss gave {shape} at exit {i + 1}; it must return one value "
            f"per image (shape ({s.shape[0]},)): fix the plugin's loss function"
        )
    return value.to(s.dtype)


def _check_teacher_shape(t: Tensor, s: Tensor, i: int, j: int) -> None:
    if t.shape != s.shape:
        raise ErdeError(
            f"teacher exit {j + 1} gives logits of shape {tuple(t.shape)} but student exit {i + 1} "
            f"{tuple(s.shape)}; use a teacher trained on the same dataset (same classes)"
        )
