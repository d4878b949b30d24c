"""The machine a command runs on: which device (`auto` picks a visible GPU, else the CPU), which
precision, its cores, and whether a size fits its memory.

Sizes from the command line or from files are checked against the machine's memory before
anything is allocated: a typo such as `--input-size 100000` is a message, not an attempt to
allocate terabytes (which the kernel may grant lazily and then kill the process for)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from erde.errors import ErdeError

if TYPE_CHECKING:  # torch loads with the first device chosen: `erde infer` needs none
    import torch


def resolve_device(name: str) -> torch.device:
    import torch

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
    import torch

    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        # Not oneDNN's `_is_mkldnn_bf16_supported`: it also says yes on plain AVX512, where bf16
        # is emulated (the cifar10-cpu teacher: 105 images/s in bf16, 279 in fp32, on a 2-core
        # Intel Xeon with AVX512 but no AVX512-BF16).
        return (
            "bf16"
            if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
            else "fp32"
        )
    return "fp32"


# Generous per-unit costs of building an early-exit network and running one image through it
# (bytes): live float32 activations per input pixel (tens of channels at full resolution, a few
# alive at once), and the float32 weights per class of the exit heads (up to 2048 features,
# several exits).
_BYTES_PER_PIXEL = 1024
_BYTES_PER_CLASS = 4 * 2048 * 4


def cores() -> int:
    """The cores this process may use (its CPU affinity where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_memory() -> int:
    """Physical memory in bytes (a large number where the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 50


def check_model_memory(num_classes: int, in_channels: int, input_size: int | None) -> None:
    """Refuse sizes whose network would need more than half the machine's memory."""
    pixels = (input_size or 224) ** 2
    need = pixels * (_BYTES_PER_PIXEL + 4 * in_channels) + num_classes * _BYTES_PER_CLASS
    need += in_channels * 64 * 9 * 4  # the stem's weights
    have = machine_memory()
    if need > have // 2:
        raise ErdeError(
            f"input_size={input_size or 224}, num_classes={num_classes}, "
            f"in_channels={in_channels} would need about {need / 2**30:,.0f} GiB of memory to "
            f"build the model and run one image (this machine has {have / 2**30:,.0f} GiB); "
            "check these sizes (--input-size, --num-classes, or the run's model.json)"
        )


def check_batch_memory(batch: int, in_channels: int, input_size: int, option: str) -> None:
    """Refuse a batch whose images and activations would need more than half the machine's
    memory (`option` names the setting to change)."""
    per_image = input_size**2 * (_BYTES_PER_PIXEL + 4 * in_channels)
    need, have = batch * per_image, machine_memory()
    if need > have // 2:
        raise ErdeError(
            f"{option} {batch} would need about {need / 2**30:,.0f} GiB of memory for one batch "
            f"of {in_channels} x {input_size} x {input_size} images and their activations (this "
            f"machine has {have / 2**30:,.0f} GiB); choose a batch of at most "
            f"{max(have // 2 // per_image, 1):,}"
        )
