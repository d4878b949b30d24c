"""ResNet-18/34 adapted to 32x32 images (the common CIFAR port of He et al. 2016).

The ImageNet 7x7 stride-2 stem and max pool are replaced by one 3x3 stride-1 conv, so the four
stages (64, 128, 256, 512 channels) run at 32, 16, 8 and 4 pixels. Shortcuts that change shape
are 1x1 conv + BN projections (option B). Blocks are torchvision's `BasicBlock`s.

Default exits: after each stage except the last -> 4 exits (ResNet-18: blocks 2, 4, 6;
ResNet-34: blocks 3, 7, 13). Inputs must be at least 8x8.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from erde.models.early_exit import Backbone, pooled_classifier
from erde.models.registry import register_model

Shortcut = Callable[[int, int, int], nn.Module]


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """The 3x3 stride-1 stem that CIFAR ResNets use instead of the ImageNet one."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def basic_block_stages(
    in_channels: int,
    widths: Sequence[int],
    depths: Sequence[int],
    shortcut: Shortcut,
) -> tuple[list[nn.Module], list[int]]:
    """Basic blocks for stages of the given widths; every stage after the first halves the size.

    `shortcut(in_channels, out_channels, stride)` builds the residual branch wherever the shape
    changes. Returns the blocks and the 1-based block index that ends each stage.
    """
    from torchvision.models.resnet import BasicBlock  # here: importing torchvision takes seconds

    blocks: list[nn.Module] = []
    stage_ends = []
    channels = in_channels
    for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            downsample = None
            if stride != 1 or channels != width:
                downsample = shortcut(channels, width, stride)
            blocks.append(BasicBlock(channels, width, stride, downsample=downsample))
            channels = width
        stage_ends.append(len(blocks))
    return blocks, stage_ends


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def _resnet(depths: Sequence[int], num_classes: int, in_channels: int) -> Backbone:
    widths = (64, 128, 256, 512)
    blocks, stage_ends = basic_block_stages(64, widths, depths, _projection)
    return Backbone(
        stem=conv_bn_relu(in_channels, 64),
        blocks=blocks,
        classifier=pooled_classifier(widths[-1], num_classes),
        stage_ends=stage_ends,
        min_input_size=8,
        he_init=True,
    )


@register_model
def resnet18(*, num_classes: int, in_channels: int) -> Backbone:
    """CIFAR ResNet-18 (3x3 stem, no max pool; 32x32 images): not torchvision/resnet18."""
    return _resnet((2, 2, 2, 2), num_classes, in_channels)


@register_model
def resnet34(*, num_classes: int, in_channels: int) -> Backbone:
    """CIFAR ResNet-34 (3x3 stem, no max pool; 32x32 images): not torchvision/resnet34."""
    return _resnet((3, 4, 6, 3), num_classes, in_channels)
