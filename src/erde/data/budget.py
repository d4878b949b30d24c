"""Whether an image folder fits the memory it would be decoded into (`data.stream=auto`).

A folder decoded whole lives as uint8 in host memory and, moved there once, on the training
device; loading holds up to three copies at once (decoded files, the stacked array, the training
split). The default budget is therefore a quarter of the memory of the machine, and of the GPU
when training on one: their sizes, not what is free at the moment, so that every process of a
multi-process run, and a later evaluation of the run, decide alike. The folder's decoded size is
estimated from a few files spread over it, decoded by the one decoder: exact for a folder of one
image size, close for the others.
"""

from __future__ import annotations

import torch

from erde.data.image_folder import decode_file
from erde.device import machine_memory

SHARE = 0.25  # of the memory, when data.device_budget_gb is not set
SAMPLE = 32  # files decoded to estimate the folder's decoded size


def device_memory(device: torch.device) -> int:
    """Bytes of the host's memory, or of the GPU's where that is smaller and `device` is one."""
    memory = machine_memory()
    if device.type == "cuda":
        memory = min(memory, torch.cuda.get_device_properties(device).total_memory)
    return memory


def budget_bytes(budget_gb: float | None, device: torch.device) -> int:
    """`data.device_budget_gb` in bytes, or the default share of the memory."""
    if budget_gb is not None:
        return int(budget_gb * 1e9)
    return int(SHARE * device_memory(device))


def decoded_bytes(paths: list[str]) -> int:
    """About how many bytes the files take decoded as uint8 (colour for all when any sampled file
    is colour, as the in-memory folder stores them)."""
    picks = sorted({i * (len(paths) - 1) // (SAMPLE - 1) for i in range(SAMPLE)})
    shapes = [decode_file(paths[i]).shape for i in picks]
    channels = max(s[2] for s in shapes)
    pixels = sum(s[0] * s[1] for s in shapes) / len(shapes)
    return int(pixels * channels * len(paths))


__all__ = ["budget_bytes", "decoded_bytes", "device_memory"]
