"""Image files to the float32 NCHW batch a model was trained on, for `erde infer` and `erde bench`.

Decoding and normalisation are `erde.data.pixels`'s, the functions training and evaluation use,
so a file gives the model the same input here as it would in an image-folder training set; that
module's docstring states the rules (bit depth, palettes, alpha, CMYK, channels, size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from erde.data.pixels import check_channels, decode_image, normalize_images


def load_image(path: str | Path, in_channels: int, input_size: int) -> np.ndarray:
    """One file as uint8 input_size x input_size x in_channels; ErdeError naming the file."""
    return decode_image(path, in_channels, input_size)


__all__ = ["check_channels", "load_image", "normalize_images"]
