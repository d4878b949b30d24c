"""Early-exit model zoo: `create_model(name, exits=...)` -> `EarlyExitNet`.

Importing this package registers every backbone family below.
"""

from erde.models import mobilenetv2, resnet, resnet_cifar, vgg, wrn  # noqa: F401  (registration)
from erde.models.early_exit import Backbone, EarlyExitNet, ExitHead
from erde.models.registry import create_model, list_models, register_model

__all__ = [
    "Backbone",
    "EarlyExitNet",
    "ExitHead",
    "create_model",
    "list_models",
    "register_model",
]
