"""The network a run config names, shaped for the data it will see."""

from __future__ import annotations

from erde.config import ModelConfig
from erde.model_info import DataInfo
from erde.models.early_exit import EarlyExitNet
from erde.models.registry import create_model


def build_model(model: ModelConfig, data: DataInfo) -> EarlyExitNet:
    return create_model(
        model.name,
        num_classes=len(data.classes),
        in_channels=data.in_channels,
        exits=model.exits,
        input_size=data.input_size,
    )
