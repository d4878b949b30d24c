"""Exit policies by name: erde's and the user's, one torch function each from logits to a score.

A policy maps logits (N x K, or N x E x K) to one score per image (N, or N x E) where lower means
more confident; `erde.evaluation.policy.exit_scores` applies it in the simulator, calibration
and diagnostics, and `erde export` traces it into every exit's ONNX piece, so the runtime only
reads the policy's name from the manifest and needs no plugin code.

Plugins register with `register_policy`, as models do with `register_model`, and come in the
same two ways: a module named by the user (`--policy-module MODULE` on the command line,
`evaluate.module` in a reproduce config), or an installed package's entry point in the group
`erde.policies` (its value a module that registers at import), loaded the first time a name is
not found.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from erde.config import plugins
from erde.errors import ErdeError
from erde.evaluation.rule import check_policy_name

GROUP = plugins.GROUPS["policy"]
ScoreFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Policy:
    name: str
    score: ScoreFn
    help: str
    # With normalize=True the score is divided by normalizer(K); None: normalize has no effect.
    normalizer: Callable[[int], float] | None
    builtin: bool


_POLICIES: dict[str, Policy] = {}


def register_policy(
    name: str,
    score_fn: ScoreFn,
    *,
    help: str,
    normalizer: Callable[[int], float] | None = None,
) -> ScoreFn:
    """Register `score_fn` (float32 logits ... x K -> scores ..., lower = more confident, made of
    tensor operations that `torch.onnx.export` traces) as the exit policy `name`.

    `normalizer(K)`, when given, is what `normalize=True` divides the score by (entropy's log K);
    without one the flag has no effect. The function is tried on a small probe tensor here, so
    a score that is not finite or not one per image is refused before any run uses it.
    """
    return _add(Policy(name, score_fn, help, normalizer, builtin=False))


def _add(policy: Policy) -> ScoreFn:
    check_policy_name(policy.name)
    known = _POLICIES.get(policy.name)
    if known is not None:
        owner = "a built-in exit policy" if known.builtin else "already registered"
        raise ErdeError(
            f"exit policy {policy.name!r} ({_where(policy.score)}) is {owner} "
            f"({_where(known.score)}); register yours under another name"
        )
    _probe(policy)
    _POLICIES[policy.name] = policy
    return policy.score


def _probe(policy: Policy) -> None:
    """Score a small batch, with ordinary and extreme logits, in both shapes the policy gets."""
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 3, 5, generator=generator)
    logits[0, 0] = torch.tensor([1e4, -1e4, 0.0, 0.0, 0.0])
    for given in (logits, logits[:, 0]):
        try:
            scores = policy.score(given)
        except Exception as exc:  # the plugin's own bug, whatever it is
            raise _refused(
                policy, f"raised {type(exc).__name__}: {plugins.one_line(exc)}"
            ) from None
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != given.shape[:-1]:
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)
            raise _refused(
                policy,
                f"gave {shape} for logits of shape {tuple(given.shape)}, not one score "
                f"per image and exit {tuple(given.shape[:-1])}",
            )
        if not torch.isfinite(scores).all():
            raise _refused(policy, "gave scores that are not finite (NaN or infinite)")
    if policy.normalizer is not None:
        bound = policy.normalizer(5)
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            raise _refused(policy, f"has normalizer(5) = {bound!r}, not a positive number")


def _refused(policy: Policy, problem: str) -> ErdeError:
    return ErdeError(
        f"exit policy {policy.name!r} ({_where(policy.score)}) {problem} on a probe batch; make "
        "it return one finite score per image (shape logits.shape[:-1]), lower = more confident"
    )


def get_policy(name: str) -> Policy:
    """The policy registered under `name`, loading the `erde.policies` entry points if unknown."""
    if name not in _POLICIES:
        plugins.load_entry_points("policy")
    policy = _POLICIES.get(name)
    if policy is None:
        raise ErdeError(
            f"unknown exit policy {name!r}; choose one of {', '.join(policy_names())}, or name "
            f"the module that registers it (--policy-module MODULE; evaluate.module in a config) "
            f"or install it as an {GROUP} entry point"
        )
    return policy


def policy_names() -> list[str]:
    """Registered names, the built-ins first: erde's and those of every installed plugin."""
    plugins.load_entry_points("policy")
    return list(_POLICIES)


def import_policy_module(module: str | None) -> None:
    """Import the module a user names, so that its policies register."""
    if not module:
        return
    try:
        importlib.import_module(module)
    except ErdeError:
        raise
    except Exception as exc:
        raise ErdeError(
            f"the exit policy module {module!r} failed to import ({type(exc).__name__}: "
            f"{plugins.one_line(exc)}); install the package or put its folder on PYTHONPATH"
        ) from None


def _where(fn: Callable[..., object]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# The built-ins, registered the way a plugin registers its own.


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (natural log) of the softmax, in [0, log K]."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def maxprob(logits: torch.Tensor) -> torch.Tensor:
    """1 - max softmax probability, in [0, 1 - 1/K]."""
    # Summing the other classes' probabilities keeps 1 - p_max accurate when p_max is within
    # float32 rounding of 1, where the subtraction would give 0.
    logp = torch.log_softmax(logits, dim=-1)
    top = logp.argmax(dim=-1, keepdim=True)
    return logp.exp().scatter(-1, top, 0.0).sum(dim=-1)


def margin(logits: torch.Tensor) -> torch.Tensor:
    """1 - (p1 - p2), one minus the gap between the two largest softmax probabilities, in
    [0, 1]; 1 - p1 is `maxprob`'s sum of the other classes, accurate near certainty."""
    second = torch.softmax(logits, dim=-1).topk(2, dim=-1).values[..., 1]
    return maxprob(logits) + second


for _builtin in (
    Policy("entropy", entropy, "Shannon entropy of the softmax", math.log, builtin=True),
    Policy("maxprob", maxprob, "1 - max probability", None, builtin=True),
    Policy("margin", margin, "1 - (top-1 - top-2 probability)", None, builtin=True),
):
    _add(_builtin)
