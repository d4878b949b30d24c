"""Image files to the float32 NCHW batch a model was trained on, for `erde infer` and `erde bench`.

Decoding and normalisation are `erde.data.pixels`'s, the functions training and evaluation use,
so a file gives the model the same input here as it would in an image-folder training set; that
module's docstring states the rules (bit depth, palettes, alpha, CMYK, channels, size).

Those rules always produce an input, even from a file unlike anything the model was trained on:
`read_image` also says when the conversion changed the picture enough (colour dropped for a grey
model, a side scaled by more than `RESIZE_FACTOR`) that the answer may mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageMode

from erde.data.pixels import check_channels, decode_image, normalize_images

# A side shrunk or stretched by more than this factor is a different picture to the model.
RESIZE_FACTOR = 2


def load_image(path: str | Path, in_channels: int, input_size: int) -> np.ndarray:
    """One file as uint8 input_size x input_size x in_channels; ErdeError naming the file."""
    return decode_image(path, in_channels, input_size)


def read_image(
    path: str | Path, in_channels: int, input_size: int
) -> tuple[np.ndarray, str | None]:
    """`load_image`, and a one-line warning (naming the file) when the conversion was drastic:
    a colour picture made grey, or a resize from a size far from the model's. None otherwise."""
    pixels = load_image(path, in_channels, input_size)
    with Image.open(path) as img:  # the header only; the pixels above are already checked
        width, height = img.size
        colour_mode = ImageMode.getmode(img.mode).basemode != "L"
    changes = []
    if in_channels == 1 and colour_mode and _has_colour(decode_image(path)):
        changes.append("colour converted to grey")
    if any(_far(side, input_size) for side in (width, height)):
        changes.append(f"resized from {width}x{height} to {input_size}x{input_size}")
    if not changes:
        return pixels, None
    reads = f"{input_size}x{input_size} {'grey' if in_channels == 1 else 'colour'} images"
    return pixels, (
        f"{path}: {' and '.join(changes)} for a model that reads {reads}; its answer may be "
        "meaningless"
    )


def _far(side: int, size: int) -> bool:
    """A side more than RESIZE_FACTOR times larger or smaller than the model's."""
    return side > RESIZE_FACTOR * size or side * RESIZE_FACTOR < size


def _has_colour(pixels: np.ndarray) -> bool:
    """Whether an H x W x C image has a pixel whose channels differ (not grey stored as RGB)."""
    return pixels.shape[2] > 1 and bool((pixels != pixels[..., :1]).any())


__all__ = ["RESIZE_FACTOR", "check_channels", "load_image", "normalize_images", "read_image"]
