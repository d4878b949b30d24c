"""MobileNetV2 (Sandler et al. 2018) adapted to 32x32 images, as in the common CIFAR ports.

Two strides of the ImageNet network become 1 (the stem and the first 24-channel bottleneck), so
the bottlenecks run at 32, 16, 8 and 4 pixels; total stride 8, so inputs must be at least 8x8.
Blocks are torchvision's 17 `InvertedResidual`s. The final head is the network's own tail:
1x1 conv to 1280 channels -> BN -> ReLU6 -> global average pool -> dropout 0.2 -> linear.

Stages (for `exits="stages"`) are the paper's seven bottleneck sequences (ends at blocks
1, 3, 6, 10, 13, 16, 17). Default exits: at the end of each resolution except the last
(blocks 3, 6, 13) -> 4 exits. `width_mult` scales every width as torchvision does.
"""

from __future__ import annotations

from torch import nn

from erde.errors import ErdeError
from erde.models.early_exit import Backbone
from erde.models.registry import register_model

# (expansion t, output channels c, repeats n, first stride s); ImageNet strides 2 -> 1 in rows 0, 2
_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _round_to_8(channels: float) -> int:
    """Nearest multiple of 8, never more than 10% below `channels` (the MobileNet rule)."""
    rounded = max(8, int(channels + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * channels else rounded


@register_model
def mobilenetv2(*, num_classes: int, in_channels: int, width_mult: float = 1.0) -> Backbone:
    """MobileNetV2, CIFAR variant: 17 blocks; default exits after blocks 3, 6, 13."""
    if not width_mult > 0:
        raise ErdeError(f"mobilenetv2 width_mult must be > 0, got {width_mult!r}")
    # Imported here: torchvision takes seconds to import and most commands never build this model.
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.ops import Conv2dNormActivation

    channels = _round_to_8(32 * width_mult)
    stem = Conv2dNormActivation(in_channels, channels, stride=1, activation_layer=nn.ReLU6)
    blocks: list[nn.Module] = []
    stage_ends = []
    for t, c, n, s in _SETTINGS:
        out_channels = _round_to_8(c * width_mult)
        for i in range(n):
            blocks.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t))
            channels = out_channels
        stage_ends.append(len(blocks))
    last = _round_to_8(1280 * max(1.0, width_mult))
    classifier = nn.Sequential(
        Conv2dNormActivation(channels, last, kernel_size=1, activation_layer=nn.ReLU6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(last, num_classes),
    )
    return Backbone(
        stem=stem,
        blocks=blocks,
        classifier=classifier,
        stage_ends=stage_ends,
        min_input_size=8,
        he_init=True,
        # the last blocks at 32, 16 and 8 pixels
        default_exits=[stage_ends[1], stage_ends[2], stage_ends[4]],
    )
