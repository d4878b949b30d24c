"""VGG-11/13/16 with BatchNorm (Simonyan & Zisserman 2015) for 32x32 images.

Five stages of 3x3 conv -> BN -> ReLU layers, each stage closed by a 2x2 max pool, so the last
feature map is 1x1 at 32x32 input (inputs must be at least 32x32). Each conv layer is one
block; a stage's max pool belongs to its last conv's block. The classifier is the small MLP of
the common CIFAR port (global average pool, which is a no-op at 32x32, then 512 -> 512 -> 512
-> classes with ReLU and dropout 0.5), which is what the usual VGG-16-BN figure of 313.73 M
MACs counts.

Default exits: after each stage except the last -> 5 exits.
"""

from __future__ import annotations

from torch import nn

from erde.models.early_exit import Backbone
from erde.models.registry import register_model

# Output channels of the conv layers, stage by stage.
_STAGES = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}


def _vgg(name: str, num_classes: int, in_channels: int) -> Backbone:
    blocks: list[nn.Module] = []
    stage_ends = []
    channels = in_channels
    for stage in _STAGES[name]:
        for i, width in enumerate(stage):
            layers = [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if i == len(stage) - 1:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            channels = width
        stage_ends.append(len(blocks))
    classifier = nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(512, 512),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(512, num_classes),
    )
    return Backbone(
        stem=nn.Identity(),
        blocks=blocks,
        classifier=classifier,
        stage_ends=stage_ends,
        min_input_size=32,
        he_init=True,
    )


@register_model
def vgg11(*, num_classes: int, in_channels: int) -> Backbone:
    """VGG-11-BN: 8 blocks; default exits after blocks 1, 2, 4, 6."""
    return _vgg("vgg11", num_classes, in_channels)


@register_model
def vgg13(*, num_classes: int, in_channels: int) -> Backbone:
    """VGG-13-BN: 10 blocks; default exits after blocks 2, 4, 6, 8."""
    return _vgg("vgg13", num_classes, in_channels)


@register_model
def vgg16(*, num_classes: int, in_channels: int) -> Backbone:
    """VGG-16-BN: 13 blocks; default exits after blocks 2, 4, 7, 10."""
    return _vgg("vgg16", num_classes, in_channels)
