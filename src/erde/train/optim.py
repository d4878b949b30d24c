"""The optimiser and the per-step learning-rate schedule of a training run."""

from __future__ import annotations

import math

import torch
from torch import nn

from erde.config.schema import TrainConfig


def lr_factor(t: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Base learning-rate multiplier at an optimiser step: linear warm-up, then the schedule."""
    total = t.epochs * steps_per_epoch
    warmup = round(t.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if t.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if t.schedule == "multistep":
        return t.gamma ** sum(step >= m * total for m in t.milestones)
    return 1.0


def build_optimizer(
    t: TrainConfig, net: nn.Module, steps_per_epoch: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD without weight decay on biases and norm parameters, and the per-step schedule."""
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=t.lr,
        momentum=t.momentum,
        nesterov=t.nesterov and t.momentum > 0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(t, step, steps_per_epoch)
    )
    return optimizer, scheduler
