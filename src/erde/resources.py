"""Sizes from the command line or from files, checked against the machine's memory before
anything is allocated: a typo such as `--input-size 100000` is a message, not an attempt to
allocate terabytes (which the kernel may grant lazily and then kill the process for)."""

from __future__ import annotations

import os

from erde.errors import ErdeError

# Generous per-unit costs of building an early-exit network and running one image through it
# (bytes): live float32 activations per input pixel (tens of channels at full resolution, a few
# alive at once), and the float32 weights per class of the exit heads (up to 2048 features,
# several exits).
_BYTES_PER_PIXEL = 1024
_BYTES_PER_CLASS = 4 * 2048 * 4


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


__all__ = ["check_batch_memory", "check_model_memory", "machine_memory"]
