"""The PyTorch side of `erde.data.decode`: normalisation of uint8 batches as tensors, for
training, evaluation and the PyTorch backends. Decoding (numpy and Pillow only) lives in
`erde.data.decode`, so the ONNX runtime reads files without importing PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from erde.data.decode import check_channels, decode_image


class Normalize:
    """uint8 N x C x H x W -> float32 (x / 255 - mean) / std per channel, as every model reads.

    Computed as (x - 255 mean) * (1 / (255 std)) with both constants rounded once from float64:
    two in-place operations per batch, and bit-identical inputs for training, evaluation and
    exported inference since all of them call this.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], device: str | torch.device = "cpu"
    ) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel, got {mean} and {std}")
        shape = (1, -1, 1, 1)
        mean64, std64 = (torch.tensor(v, dtype=torch.float64) for v in (mean, std))
        self.shift = mean64.mul(255).float().view(shape).to(device)
        self.scale = (1 / std64.mul(255)).float().view(shape).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised float32 copy of a uint8 N x C x H x W batch (the input is untouched)."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != self.shift.shape[1]:
            raise ValueError(
                f"need uint8 N x {self.shift.shape[1]} x H x W images, got {x.dtype} "
                f"{tuple(x.shape)}"
            )
        return x.to(torch.float32).sub_(self.shift).mul_(self.scale)


class Renormalize:
    """Batches normalised with one set of statistics -> the same pixels normalised with another.

    A teacher must read images normalised as it was trained, whatever its student's statistics.
    Every batch is `Normalize` of uint8 pixels, so the pixels come back exactly by rounding (the
    float32 error is far below half a level) and go through the other `Normalize`: the teacher
    sees bit for bit what its own batches would hold. Equal statistics: the batch unchanged.
    """

    def __init__(
        self,
        source: tuple[Sequence[float], Sequence[float]],
        target: tuple[Sequence[float], Sequence[float]],
        device: str | torch.device = "cpu",
    ) -> None:
        same = [list(map(float, v)) for v in source] == [list(map(float, v)) for v in target]
        self._source = None if same else Normalize(*source, device)
        self._target = Normalize(*target, device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._source is None:
            return x
        s = self._source
        pixels = x.div(s.scale).add_(s.shift).round_().clamp_(0, 255).to(torch.uint8)
        return self._target(pixels)


def normalize_images(
    images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 N x H x W x C (as decoded and stored) -> float32 N x C x H x W, normalised."""
    x = torch.as_tensor(images)
    if x.dim() != 4:
        raise ValueError(f"need uint8 N x H x W x C images, got {x.dtype} {tuple(x.shape)}")
    return Normalize(mean, std)(x.permute(0, 3, 1, 2)).contiguous()


__all__ = ["Normalize", "Renormalize", "check_channels", "decode_image", "normalize_images"]
