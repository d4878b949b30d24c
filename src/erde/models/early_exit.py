"""The early-exit network: a backbone cut into segments, with one classifier head per cut.

Segments and heads are separate modules so that the training engine can run them all at once
while the deployment runtime can stop after any segment whose head is confident enough.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Backbone:
    """What a registered builder returns: the plain network, split into blocks.

    `classifier` maps the output of the last block to logits (the backbone's own head, including
    any final conv/BN it has). `stage_ends` are the 1-based block indices that close a stage (the
    last one equals the number of blocks). `min_input_size` is the product of the network's
    strides: below it a stride has nothing left to halve.
    """

    stem: nn.Module
    blocks: list[nn.Module]
    classifier: nn.Module
    stage_ends: list[int]
    min_input_size: int
    default_exits: str | list[int] = "stages"


class ExitHead(nn.Sequential):
    """The paper's shallow exit: BN -> ReLU -> 2x2 avg pool -> dropout -> flatten -> linear.

    The pool is left out when the feature map is already smaller than 2x2, where it would have
    nothing to average (and would fail).
    """

    def __init__(
        self, channels: int, height: int, width: int, num_classes: int, dropout: float = 0.5
    ) -> None:
        pool = height >= 2 and width >= 2
        out_h, out_w = (height // 2, width // 2) if pool else (height, width)
        layers: list[nn.Module] = [nn.BatchNorm2d(channels), nn.ReLU()]
        if pool:
            layers.append(nn.AvgPool2d(2))
        layers += [
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(channels * out_h * out_w, num_classes),
        ]
        super().__init__(*layers)


class EarlyExitNet(nn.Module):
    """A backbone with exits after chosen blocks; `forward` returns every exit's logits.

    `segments[i]` runs the blocks between exit i-1 and exit i (the stem is in the first), and
    `heads[i]` classifies its output; `heads[-1]` is the backbone's own classifier, so the last
    exit computes exactly the plain network.
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
        heads: list[nn.Module] = [ExitHead(*shape, num_classes) for shape in shapes[:-1]]
        heads.append(backbone.classifier)
        self.heads = nn.ModuleList(heads)
        self.apply(_init_weights)

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
