"""Which device a command runs on: `auto` picks a visible GPU, else the CPU."""

from __future__ import annotations

import torch

from erde.errors import ErdeError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ErdeError(
            f"train.device={name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ErdeError(f"train.device={name} but no CUDA GPU is visible; use train.device=cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 where the device computes it natively (CUDA with bf16, a CPU with
    AVX512-BF16 or AMX), else fp32. Other names pass through."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    return "fp32"
