"""The training engine: `fit` a config into a run folder (checks, setup, resume, epoch loop)."""

from erde.train.engine import fit

__all__ = ["fit"]
