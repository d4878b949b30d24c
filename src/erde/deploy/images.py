"""Image files to the float32 NCHW batch a model was trained on, for `erde infer` and `erde bench`.

Decoding, the resize and centre crop, and normalisation are `erde.data.decode`'s, the functions
training and evaluation use, so a file gives the model the same input here as evaluation gave
it; that module's docstring states the rules (bit depth, palettes, alpha, CMYK, channels, size).

Numpy and Pillow only, for the ONNX runtime: `normalize_array` is the numpy normalisation, and
`normalize_images` (its torch form, the same values) is imported from `erde.data.pixels` on
first use, so importing this module does not load PyTorch.

Those rules always produce an input, even from a file unlike anything the model was trained on:
`read_image` also says when the conversion changed the picture enough (colour dropped for a grey
model, a side scaled by more than `RESIZE_FACTOR`) that the answer may mean nothing.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageMode

from erde.data.decode import check_channels, decode_image, normalize_array
from erde.errors import ErdeError

# A side shrunk or stretched by more than this factor is a different picture to the model.
RESIZE_FACTOR = 2
# Named when a folder holds no image file (Pillow reads many more).
_COMMON = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".webp")


def load_image(
    path: str | Path, in_channels: int, input_size: int, crop: float = 1.0
) -> np.ndarray:
    """One file as uint8 input_size x input_size x in_channels, brought to size by evaluation's
    rule (shorter side to round(input_size / crop), centre crop: `decode.resize_crop`);
    ErdeError naming the file."""
    return decode_image(path, in_channels, input_size, crop)


def read_image(
    path: str | Path, in_channels: int, input_size: int, crop: float = 1.0
) -> tuple[np.ndarray, str | None]:
    """`load_image`, and a one-line warning (naming the file) when the conversion was drastic:
    a colour picture made grey, or a resize from a size far from the model's. None otherwise."""
    pixels = load_image(path, in_channels, input_size, crop)
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


def image_paths(arguments: Sequence[str]) -> list[str]:
    """`erde infer`'s IMAGE arguments as files, in order: a file as given (a missing one too: its
    row will say so), a folder as its image files sorted by name (not its subfolders), and a
    glob pattern the shell left unexpanded (quoted, or from Windows) as the files it matches,
    sorted (folders it matches are skipped: `photos/**` means the files below photos).
    ErdeError for a folder without images or a pattern that matches no file."""
    found: list[str] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found += _folder_images(path)
        elif not path.exists() and glob.escape(argument) != argument:
            matches = sorted(m for m in glob.glob(argument, recursive=True) if not Path(m).is_dir())
            if not matches:
                raise ErdeError(f"{argument} matches no file; check the pattern")
            found += matches
        else:
            found.append(argument)
    return found


def _folder_images(folder: Path) -> list[str]:
    """The files of a folder whose extension Pillow reads, sorted by name."""
    extensions = Image.registered_extensions()  # loads every Pillow plugin: only for folders
    images = sorted(
        str(p) for p in folder.iterdir() if p.suffix.lower() in extensions and p.is_file()
    )
    if not images:
        raise ErdeError(
            f"{folder} is a folder without image files ({', '.join(_COMMON)}, ...); give image "
            "files or a folder that holds some"
        )
    return images


def __getattr__(name: str) -> Any:
    """`normalize_images`, the torch normalisation, imported only when asked for (PEP 562)."""
    if name != "normalize_images":
        raise AttributeError(f"module 'erde.deploy.images' has no attribute {name!r}")
    from erde.data.pixels import normalize_images

    return normalize_images


__all__ = [
    "RESIZE_FACTOR",
    "check_channels",
    "image_paths",
    "load_image",
    "normalize_array",
    "read_image",
]
