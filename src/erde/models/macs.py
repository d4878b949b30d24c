"""Compute per exit, in MACs for one image at the model's input size.

One MAC is one multiply-accumulate of a convolution or linear layer; BatchNorm, activations,
pooling and additions are not counted (the torchvision convention). Counts come from
`torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2), so they follow the real modules rather
than a formula that could drift from them.

Exit i costs everything a sample that leaves there has run: segments 1..i and heads 1..i (the
heads of exits it did not take were evaluated too, to decide not to take them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from erde.models.early_exit import EarlyExitNet


def exit_macs(model: EarlyExitNet) -> list[int]:
    """Cumulative MACs of exits 1..n for one image."""
    return [row["cumulative_macs"] for row in macs_table(model)]


def static_macs(model: EarlyExitNet) -> int:
    """MACs of the plain network: all segments plus the final head, no intermediate heads."""
    segments, heads = _segment_and_head_macs(model)
    return sum(segments) + heads[-1]


def macs_table(model: EarlyExitNet) -> list[dict[str, Any]]:
    """One row per exit: exit (1-based), block, segment_macs, head_macs, cumulative_macs,
    percent_of_full (cumulative as a percentage of the last exit's)."""
    segments, heads = _segment_and_head_macs(model)
    rows, total = [], 0
    for i, (block, seg, head) in enumerate(zip(model.exit_blocks, segments, heads, strict=True)):
        total += seg + head
        rows.append(
            {
                "exit": i + 1,
                "block": block,
                "segment_macs": seg,
                "head_macs": head,
                "cumulative_macs": total,
            }
        )
    for row in rows:
        row["percent_of_full"] = 100.0 * row["cumulative_macs"] / total
    return rows


def _segment_and_head_macs(model: EarlyExitNet) -> tuple[list[int], list[int]]:
    """Counts one dummy image in eval mode and without gradients, then restores every module's
    mode, so counting never touches BatchNorm statistics or weights."""
    modes = {module: module.training for module in model.modules()}
    param = next(model.parameters())
    x = torch.zeros(
        1,
        model.in_channels,
        model.input_size,
        model.input_size,
        device=param.device,
        dtype=param.dtype,
    )
    segments, heads = [], []
    model.eval()
    try:
        with torch.no_grad():
            for segment, head in zip(model.segments, model.heads, strict=True):
                macs, x = _count(segment, x)
                segments.append(macs)
                heads.append(_count(head, x)[0])
    finally:
        for module, training in modes.items():
            module.training = training
    return segments, heads


def _count(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    with FlopCounterMode(display=False) as counter:
        out = module(x)
    return counter.get_total_flops() // 2, out
