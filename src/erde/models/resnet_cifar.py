"""The CIFAR ResNets of He et al. 2016 (section 4.2): depth 6n+2, three stages of n basic blocks
with 16, 32 and 64 channels at 32, 16 and 8 pixels, global average pool, one linear layer.

Shortcuts are option A, the paper's choice for CIFAR: parameter-free, a stride-2 subsample
padded with zero channels. This is the variant behind the usual figures (ResNet-56: 125.49 M
MACs and 0.85 M parameters, ResNet-110: 252.89 M and 1.73 M). Ports with 1x1 projection
shortcuts (option B) cost 262,144 MACs more, hence the other common figure for ResNet-20
(40.81 M instead of 40.55 M).

Blocks are the 3n basic blocks. Default exits: after each stage except the last (blocks n and
2n) -> 3 exits. Inputs must be at least 4x4.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from erde.models.early_exit import Backbone, pooled_classifier
from erde.models.registry import register_model
from erde.models.resnet import basic_block_stages, conv_bn_relu


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: keep every `stride`-th pixel and append zero channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def _cifar_resnet(depth: int, num_classes: int, in_channels: int) -> Backbone:
    n = (depth - 2) // 6
    blocks, stage_ends = basic_block_stages(16, (16, 32, 64), (n, n, n), ZeroPadShortcut)
    return Backbone(
        stem=conv_bn_relu(in_channels, 16),
        blocks=blocks,
        classifier=pooled_classifier(64, num_classes),
        stage_ends=stage_ends,
        min_input_size=4,
        he_init=True,
    )


@register_model
def resnet8(*, num_classes: int, in_channels: int) -> Backbone:
    """CIFAR ResNet-8 (He et al. 2016, n=1): 3 blocks; exits after 1, 2."""
    return _cifar_resnet(8, num_classes, in_channels)


@register_model
def resnet14(*, num_classes: int, in_channels: int) -> Backbone:
    """CIFAR ResNet-14 (n=2): 6 blocks; exits after 2, 4."""
    return _cifar_resnet(14, num_classes, in_channels)


@register_model
def resnet20(*, num_classes: int, in_channels: int) -> Backbone:
    """CIFAR ResNet-20 (He et al. 2016, n=3): 9 blocks; exits after 3, 6."""
    return _cifar_resnet(20, num_classes, in_channels)


@register_model
def resnet32(*, num_classes: int, in_channels: int) -> Backbone:
    """CIFAR ResNet-32 (He et al. 2016, n=5): 15 blocks; exits after 5, 10."""
    return _cifar_resnet(32, num_classes, in_channels)


@register_model
def resnet44(*, num_classes: int, in_channels: int) -> Backbone:
    """CIFAR ResNet-44 (He et al. 2016, n=7): 21 blocks; exits after 7, 14."""
    return _cifar_resnet(44, num_classes, in_channels)


@register_model
def resnet56(*, num_classes: int, in_channels: int) -> Backbone:
    """CIFAR ResNet-56 (He et al. 2016, n=9): 27 blocks; exits after 9, 18."""
    return _cifar_resnet(56, num_classes, in_channels)


@register_model
def resnet110(*, num_classes: int, in_channels: int) -> Backbone:
    """CIFAR ResNet-110 (He et al. 2016, n=18): 54 blocks; exits after 18, 36."""
    return _cifar_resnet(110, num_classes, in_channels)
