"""The network a run config names, shaped for the data it will see."""

from __future__ import annotations

from erde.config.schema import ModelConfig
from erde.models.early_exit import EarlyExitNet
from erde.models.registry import create_model
from erde.run.model_info import DataInfo

_LIBRARY_WEIGHTS = ("true", "yes", "on", "1")  # how a YAML/CLI `true` reaches a str key


def build_model(
    model: ModelConfig, data: DataInfo, *, freeze_backbone: bool = False
) -> EarlyExitNet:
    """The model of `model.name` with `model.options`, and `model.pretrained` loaded (a file,
    or the library's weights for `true`); with `freeze_backbone` only its exit heads learn."""
    pretrained = model.pretrained
    if isinstance(pretrained, str) and pretrained.strip().lower() in _LIBRARY_WEIGHTS:
        pretrained = True
    net = create_model(
        model.name,
        num_classes=len(data.classes),
        in_channels=data.in_channels,
        exits=model.exits,
        head=model.head,
        input_size=data.input_size,
        module=model.module,
        pretrained=pretrained or None,
        **dict(model.options),
    )
    if freeze_backbone:
        net.freeze_backbone()
    return net
