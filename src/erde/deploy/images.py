"""Image files to the float32 NCHW batch a model was trained on.

- Decoding: Pillow; the whole file is decoded at once, so a truncated or corrupt file is refused
  here with its name rather than failing later.
- Colour: a 1-channel model gets Pillow's "L" (ITU-R 601-2 luma) of a colour file; a 3-channel
  model gets a grey file repeated into R, G and B. Alpha is dropped and palettes are expanded
  (Pillow's `convert`). 16-bit and floating-point files are refused: their range has no one
  right mapping to the 8-bit range the model was trained on. Models with other channel counts
  (possible with npz data) cannot be fed from image files at all.
- Size: resized to input_size x input_size with Pillow's bilinear filter (antialiased when
  shrinking). A non-square image is stretched; crop it first if its aspect ratio matters.
- Normalisation: per channel (x / 255 - mean) / std with the run's statistics, computed exactly
  as `erde.data.DeviceBatches` does in training and evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from erde.errors import ErdeError

_HIGH_DEPTH = ("I", "F")  # Pillow modes of 32-bit int / float images; "I;16*" start with "I"


def check_channels(in_channels: int) -> None:
    if in_channels not in (1, 3):
        raise ErdeError(
            f"the model takes {in_channels}-channel images, but image files only give grey (1) "
            "or colour (3) channels; feed it arrays in the training format instead"
        )


def load_image(path: str | Path, in_channels: int, input_size: int) -> np.ndarray:
    """One file as uint8 input_size x input_size x in_channels; ErdeError naming the file."""
    check_channels(in_channels)
    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        raise ErdeError(f"{path}: no such file; check the path") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ErdeError(
            f"{path}: cannot decode the image ({type(exc).__name__}: {exc}); give a readable "
            "PNG, JPEG or other Pillow-supported file"
        ) from None
    if img.mode.startswith(_HIGH_DEPTH):
        raise ErdeError(
            f"{path}: {img.mode} images (16-bit or floating point) are not supported; save it "
            "as an 8-bit grey or RGB image"
        )
    target = "L" if in_channels == 1 else "RGB"
    try:
        img = img.convert(target)
    except ValueError as exc:
        raise ErdeError(
            f"{path}: its {img.mode} pixels cannot be converted to {target} ({exc}); save it "
            "as an 8-bit grey or RGB image"
        ) from None
    if img.size != (input_size, input_size):
        img = img.resize((input_size, input_size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8).reshape(input_size, input_size, in_channels)


def normalize_images(
    images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 N x H x W x C -> float32 N x C x H x W, normalised as in training."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[3] != len(mean) or len(std) != len(mean):
        raise ValueError(
            f"need uint8 N x H x W x {len(mean)} images, got {x.dtype} {tuple(x.shape)}"
        )
    shape = (1, -1, 1, 1)
    shift = torch.tensor(mean, dtype=torch.float64).mul(255).float().view(shape)
    scale = (1 / torch.tensor(std, dtype=torch.float64).mul(255)).float().view(shape)
    return x.permute(0, 3, 1, 2).to(torch.float32).sub_(shift).mul_(scale).contiguous()
