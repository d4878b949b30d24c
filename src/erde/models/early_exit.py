"""The early-exit network: a backbone cut into segments, with one classifier head per cut.

Segments and heads are separate modules so that the training engine can run them all at once
while the deployment runtime can stop after any segment whose head is confident enough.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from erde.errors import ErdeError


@dataclass
class Backbone:
    """What a registered builder returns: the plain network, split into blocks.

    `classifier` maps the output of the last block to logits (the backbone's own head, including
    any final conv/BN it has). `stage_ends` are the 1-based block indices that close a stage (the
    last one equals the number of blocks). `min_input_size` is the product of the network's
    strides: below it a stride has nothing left to halve; `input_size` is the size the network
    was designed for (the default of `create_model`).

    `exit_head(*feature_shape, num_classes)` builds the head of an early exit (default
    `ExitHead`). `he_init` asks EarlyExitNet to He-initialise every conv (erde's CIFAR recipe);
    otherwise the builder's weights are kept as they are (pretrained or the library's own init).
    `network` is the plain network the blocks were cut from, when there is one: its parameter
    names are the ones a pretrained file uses. `weights` names the pretrained weights loaded
    (None: fresh), and `weights_mean`/`weights_std` the normalisation they were trained with
    where the library records it, which fine-tuning keeps.
    """

    stem: nn.Module
    blocks: list[nn.Module]
    classifier: nn.Module
    stage_ends: list[int]
    min_input_size: int
    default_exits: str | list[int] = "stages"
    input_size: int = 32
    exit_head: Callable[..., nn.Module] | None = None
    he_init: bool = False
    network: nn.Module | None = None
    weights: str | None = None
    weights_mean: tuple[float, ...] | None = None
    weights_std: tuple[float, ...] | None = None


HEADS = ("paper", "pool")  # `model.head`: ExitHead as the paper has it, or globally pooled


class ExitHead(nn.Sequential):
    """The paper's shallow exit: BN -> ReLU -> 2x2 avg pool -> dropout -> flatten -> linear.

    The pool is left out when the feature map is already smaller than 2x2, where it would have
    nothing to average (and would fail). With `pool_to`, a map larger than that pools adaptively
    to `pool_to` x `pool_to` instead: at ImageNet sizes a 2x2 pool would leave a linear layer of
    hundreds of millions of weights.
    """

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        num_classes: int,
        dropout: float = 0.5,
        pool_to: int | None = None,
    ) -> None:
        pool: nn.Module | None = None
        out_h, out_w = height, width
        if pool_to is not None and max(height, width) > pool_to:
            out_h, out_w = min(height, pool_to), min(width, pool_to)
            pool = nn.AdaptiveAvgPool2d((out_h, out_w))
        elif pool_to is None and height >= 2 and width >= 2:
            out_h, out_w = height // 2, width // 2
            pool = nn.AvgPool2d(2)
        layers: list[nn.Module] = [nn.BatchNorm2d(channels), nn.ReLU()]
        if pool is not None:
            layers.append(pool)
        layers += [
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(channels * out_h * out_w, num_classes),
        ]
        super().__init__(*layers)


class TokenExitHead(nn.Module):
    """A transformer's early exit: LayerNorm, then dropout and a linear layer on the class token
    (token 0), as the network's own head reads its last block."""

    def __init__(self, tokens: int, dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.dropout(self.norm(x)[:, 0]))


class EarlyExitNet(nn.Module):
    """A backbone with exits after chosen blocks; `forward` returns every exit's logits.

    `segments[i]` runs the blocks between exit i-1 and exit i (the stem is in the first), and
    `heads[i]` classifies its output; `heads[-1]` is the backbone's own classifier, so the last
    exit computes exactly the plain network. Only the new exit heads are initialised here; the
    builder's weights are kept (see `Backbone.he_init`). `source_keys` maps the plain network's
    parameter names to this module's, for pretrained files.
    """

    def __init__(
        self,
        backbone: Backbone,
        exits: Sequence[int],
        *,
        num_classes: int,
        in_channels: int,
        input_size: int,
        arch: dict[str, Any] | None = None,
        head: str = "paper",
    ) -> None:
        super().__init__()
        self.num_blocks = len(backbone.blocks)
        self.exit_blocks = [*exits, self.num_blocks]
        self.num_exits = len(self.exit_blocks)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = input_size
        self.arch = dict(arch or {})

        segments, start = [], 0
        for i, end in enumerate(self.exit_blocks):
            layers = ([backbone.stem] if i == 0 else []) + backbone.blocks[start:end]
            segments.append(nn.Sequential(*layers))
            start = end
        self.segments = nn.ModuleList(segments)

        shapes = _feature_shapes(self.segments, in_channels, input_size)
        make_head = backbone.exit_head or ExitHead
        if head == "pool" and make_head is not TokenExitHead:  # a token head reads one token
            make_head = partial(ExitHead, pool_to=1)
        heads: list[nn.Module] = [make_head(*shape, num_classes) for shape in shapes[:-1]]
        heads.append(backbone.classifier)
        self.heads = nn.ModuleList(heads)
        # After the heads, as always: the RNG order, hence erde's seeded weights, stay the same.
        for module in [self] if backbone.he_init else heads[:-1]:
            module.apply(_init_weights)
        self.source_keys = _source_keys(self, backbone.network)
        self.family = None if backbone.network is None else type(backbone.network).__name__
        self.frozen = False
        # Where the weights came from (model.json `weights`), and their normalisation if known.
        self.weights = backbone.weights
        self.weights_normalization = (
            None
            if backbone.weights_mean is None or backbone.weights_std is None
            else (backbone.weights_mean, backbone.weights_std)
        )

    def freeze_backbone(self) -> None:
        """Train only the exit heads: the builder's modules (segments and the last head) stop
        learning and stay in eval mode, so BatchNorm statistics and dropout stay as loaded."""
        if self.num_exits == 1:
            raise ErdeError(
                "train.freeze_backbone=true trains only the exit heads, but this "
                f"{self.arch.get('name', 'model')} has none; set model.exits (e.g. stages)"
            )
        for module in [*self.segments, self.heads[-1]]:
            module.requires_grad_(False)
        self.frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> EarlyExitNet:
        super().train(mode)
        if self.frozen:
            for module in [self.segments, self.heads[-1]]:
                module.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        logits = []
        for segment, head in zip(self.segments, self.heads, strict=True):
            x = segment(x)
            logits.append(head(x))
        return logits


@torch.no_grad()
def _feature_shapes(
    segments: nn.ModuleList, in_channels: int, input_size: int
) -> list[tuple[int, int, int]]:
    """(C, H, W) after each segment, from one dummy image; eval mode so BN stats stay untouched."""
    was_training = segments.training
    segments.eval()
    x = torch.zeros(1, in_channels, input_size, input_size)
    shapes = []
    for segment in segments:
        x = segment(x)
        shapes.append(tuple(x.shape[1:]))
    segments.train(was_training)
    return shapes


def _source_keys(net: EarlyExitNet, network: nn.Module | None) -> dict[str, str]:
    """Plain-network name -> EarlyExitNet name of every backbone tensor, matched by identity
    (the blocks are the network's own modules). Without a network the backbone's own names."""
    mine = {id(t): name for name, t in net.state_dict(keep_vars=True).items()}
    if network is None:
        exit_heads = tuple(f"heads.{i}." for i in range(len(net.heads) - 1))
        return {name: name for name in mine.values() if not name.startswith(exit_heads)}
    theirs = network.state_dict(keep_vars=True).items()
    return {name: mine[id(t)] for name, t in theirs if id(t) in mine}


def _init_weights(module: nn.Module) -> None:
    """He init for convs (the CIFAR ResNet/WRN recipe); BN starts as identity."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def pooled_classifier(channels: int, num_classes: int, *prefix: nn.Module) -> nn.Sequential:
    """The usual final head: optional `prefix` layers, global average pool, flatten, linear."""
    return nn.Sequential(
        *prefix, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)
    )
