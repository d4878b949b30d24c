"""erde: early-exit image classifiers trained by Entropy-Regularized Distillation."""

from erde.errors import ErdeError

__version__ = "0.1.0"
__all__ = ["ErdeError", "__version__"]
