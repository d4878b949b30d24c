"""Cutting a library network (timm, torchvision) into erde's stem, blocks and classifier.

The pieces are the network's own modules, so its weights (random or pretrained) are kept, and
`check_same_output` proves on a random input that stem -> blocks -> classifier computes what
the network's `forward` computes: a library version that changed its forward is caught when
the model is built, not after training.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from erde.errors import ErdeError

_PLAIN = (bool, int, float, str, tuple, type(None))


class Borrowed(nn.Module):
    """A slice of a library module: the named submodules and parameters of `source`, its plain
    settings (drop rates, token counts...), and `forward = fn(self, x)`.

    Attributes it does not hold resolve to `source`'s class, bound to this slice, so `fn` may be
    one of the library's own methods (`forward_head`) calling its other methods (`pool`).
    """

    def __init__(
        self, source: nn.Module, names: Sequence[str], fn: Callable[[Any, Tensor], Tensor]
    ) -> None:
        super().__init__()
        for key, value in vars(source).items():
            if not key.startswith("_") and key != "training" and isinstance(value, _PLAIN):
                setattr(self, key, value)
        for name in names:
            setattr(self, name, getattr(source, name))
        self._cls = type(source)
        self._fn = fn

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            attr = getattr(self.__dict__.get("_cls"), name, None)
            if not callable(attr):
                raise
            return types.MethodType(attr, self)

    def forward(self, x: Tensor) -> Tensor:
        return self._fn(self, x)


def leftover_children(model: nn.Module, used: Sequence[str]) -> list[str]:
    """Names of `model`'s direct submodules and parameters that `used` does not take: what the
    library's head method reads."""
    names = [n for n, _ in model.named_children()]
    names += [n for n, _ in model.named_parameters(recurse=False)]
    return [n for n in names if n not in used]


def stage_ends_by_size(
    stem: nn.Module, blocks: Sequence[nn.Module], in_channels: int, input_size: int
) -> list[int]:
    """1-based indices of the blocks after which the feature map shrinks (and the last block):
    the stage boundaries of a network whose blocks are listed one by one."""
    x = torch.zeros(1, in_channels, input_size, input_size)
    sizes = []
    with torch.no_grad(), _eval(nn.ModuleList([stem, *blocks])):
        x = stem(x)
        for block in blocks:
            x = block(x)
            sizes.append(tuple(x.shape[2:]))
    ends = [i + 1 for i in range(len(sizes) - 1) if sizes[i + 1] != sizes[i]]
    return [*ends, len(blocks)]


def transformer_exits(depth: int) -> list[int]:
    """Default exits of a transformer: after a quarter, half and three quarters of its blocks."""
    return sorted({max(1, depth * k // 4) for k in (1, 2, 3)} - {depth})


def check_same_output(
    family: str,
    network: nn.Module,
    pieces: Sequence[nn.Module],
    in_channels: int,
    input_size: int,
) -> None:
    """The pieces run in order must give the network's output on a random image (eval mode;
    the modes are restored). Skipped on the meta device, where there are no values."""
    if any(p.is_meta for p in network.parameters()):
        return
    seeded = torch.Generator().manual_seed(0)  # the caller's random stream stays untouched
    x = torch.randn(2, in_channels, input_size, input_size, generator=seeded)
    with torch.no_grad(), _eval(network):
        expected = network(x)
        got = x
        for piece in pieces:
            got = piece(got)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else None
        raise ErdeError(
            f"{family}: the network cut at its stages does not compute what the network "
            f"computes (shapes {tuple(got.shape)} vs {tuple(expected.shape)}, largest "
            f"difference {diff}); this library version changed the family's forward: "
            "report it, or pin the library version erde was tested with"
        )


class _eval:
    """Eval mode inside the block, every module's own mode back afterwards."""

    def __init__(self, module: nn.Module) -> None:
        self.modes = {m: m.training for m in module.modules()}
        self.module = module

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        for module, training in self.modes.items():
            module.training = training
