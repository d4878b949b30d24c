"""A run's weights and training state after each epoch, and the kept checkpoints.

Two halves, so that the writer puts the epoch's metrics row between them: the weights first,
the state last (the state says the epoch is done). A crash in between resumes that epoch again
and overwrites its weights and its row, never the reverse.
"""

from __future__ import annotations

from torch import nn

from erde.run import checkpoint as ckpt
from erde.run.layout import RunDir
from erde.run.model_info import ModelInfo


class Checkpointer:
    """`every`: keep a copy of the weights every that many epochs (`train.checkpoint_every`)."""

    def __init__(self, run: RunDir, every: int) -> None:
        self.run, self.every = run, every

    def save_weights(self, net: nn.Module, info: ModelInfo) -> None:
        ckpt.save_weights(self.run.weights, net, info, self.run.sidecar)
        if self.every and info.epoch % self.every == 0 and not info.finished:
            ckpt.save_weights(self.run.checkpoint(info.epoch), net, info)

    def save_state(self, state: dict) -> None:
        ckpt.save_state(self.run.path, state)
