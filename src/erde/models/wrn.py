"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016) for 32x32 images.

A 3x3 conv to 16 channels, then three groups of (d-4)/6 pre-activation basic blocks with 16k,
32k and 64k channels at 32, 16 and 8 pixels, then BN -> ReLU -> global average pool -> linear
(the final BN-ReLU is part of the last exit's head). Shape-changing shortcuts are 1x1 convs on
the pre-activated input, as in the authors' code. `dropout` sits between a block's two convs.

Default exits: after each group except the last -> 3 exits. Inputs must be at least 4x4.
`wrn` builds any depth and width (depth = 6N+4); the common ones are registered by name.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from erde.errors import ErdeError
from erde.models.early_exit import Backbone, pooled_classifier
from erde.models.registry import register_model


class WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + residual


@register_model
def wrn(
    *,
    num_classes: int,
    in_channels: int,
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
) -> Backbone:
    """WRN-depth-widen_factor; depth must be 6N+4 (N blocks per group)."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ErdeError(f"WRN depth must be 6N+4 with N >= 1 (10, 16, 22, 28, 40...), got {depth}")
    if not isinstance(widen_factor, int) or widen_factor < 1:
        raise ErdeError(f"WRN widen_factor must be a whole number >= 1, got {widen_factor!r}")
    if not 0.0 <= dropout < 1.0:
        raise ErdeError(f"WRN dropout must be in [0, 1), got {dropout!r}")
    n = (depth - 4) // 6
    widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    blocks: list[nn.Module] = []
    channels = 16
    for group, width in enumerate(widths):
        for i in range(n):
            stride = 2 if group > 0 and i == 0 else 1
            blocks.append(WideBlock(channels, width, stride, dropout))
            channels = width
    return Backbone(
        stem=nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
        blocks=blocks,
        classifier=pooled_classifier(
            channels, num_classes, nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        ),
        stage_ends=[n, 2 * n, 3 * n],
        min_input_size=4,
        he_init=True,
    )


@register_model
def wrn16_4(*, num_classes: int, in_channels: int, dropout: float = 0.0) -> Backbone:
    """WRN-16-4: 6 blocks; default exits after blocks 2, 4."""
    return wrn(
        num_classes=num_classes, in_channels=in_channels, depth=16, widen_factor=4, dropout=dropout
    )


@register_model
def wrn16_8(*, num_classes: int, in_channels: int, dropout: float = 0.0) -> Backbone:
    """WRN-16-8: 6 blocks; default exits after blocks 2, 4."""
    return wrn(
        num_classes=num_classes, in_channels=in_channels, depth=16, widen_factor=8, dropout=dropout
    )


@register_model
def wrn28_10(*, num_classes: int, in_channels: int, dropout: float = 0.0) -> Backbone:
    """WRN-28-10: 12 blocks; default exits after blocks 4, 8."""
    return wrn(
        num_classes=num_classes, in_channels=in_channels, depth=28, widen_factor=10, dropout=dropout
    )


@register_model
def wrn40_2(*, num_classes: int, in_channels: int, dropout: float = 0.0) -> Backbone:
    """WRN-40-2: 18 blocks; default exits after blocks 6, 12."""
    return wrn(
        num_classes=num_classes, in_channels=in_channels, depth=40, widen_factor=2, dropout=dropout
    )


@register_model
def wrn40_4(*, num_classes: int, in_channels: int, dropout: float = 0.0) -> Backbone:
    """WRN-40-4: 18 blocks; default exits after blocks 6, 12."""
    return wrn(
        num_classes=num_classes, in_channels=in_channels, depth=40, widen_factor=4, dropout=dropout
    )
