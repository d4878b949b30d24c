"""Image files and uint8 arrays to what a model reads, with numpy and Pillow only (no PyTorch).

Training (`imagefolder`), evaluation and `erde infer` all go through these two, so a model sees
the same pixels from a file whichever command reads it.

Decoding (Pillow; the whole file is decoded at once, so a truncated or corrupt file is refused
here with its name rather than failing later):

- Bit depth: 16-bit grey ("I;16*", and "I" holding 0..65535) is scaled to 8 bits,
  round(v * 255 / 65535); 16-bit colour PNGs Pillow itself reads as 8-bit RGB. Floating-point
  files ("F") are refused: their range has no one right mapping to the 8-bit range.
- Colour: "1", "L" and "LA" files are grey; palettes are expanded ("P" -> RGBA); alpha is dropped
  (not composited onto a background); CMYK, YCbCr, HSV become RGB with Pillow's `convert`.
- Channels: a 1-channel model gets Pillow's "L" (ITU-R 601-2 luma) of a colour file; a
  3-channel model gets a grey file repeated into R, G and B. Without a channel count the file
  keeps its own: 1 for grey, 3 for everything else.
- Size: optionally brought to size x size by the one evaluation rule (`resize_crop`): the
  shorter side resized to round(size / crop) with Pillow's bilinear filter (antialiased when
  shrinking), then the centre size x size cut out. Streamed evaluation, `erde infer`,
  `predict_files` and an export's manifest follow it; an image already size x size is kept as
  it is at crop 1 (every in-memory data set: CIFAR, digits).
- A damaged file is one ErdeError naming it; Pillow's warnings and log records are not
  shown, and for TIFFs neither are libtiff's lines, which it writes to stderr from C (silenced
  during the decode).
- Pillow's decompression-bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`) refuses an image with more
  pixels than that, with an ErdeError instead of Pillow's warning or exception.

Normalisation: per channel (x / 255 - mean) / std with the data's statistics (docs/method.md,
"Evaluation protocol": statistics of the training split). `normalize_array` is the numpy form for
the ONNX runtime, which must not need PyTorch; `erde.data.pixels.Normalize` the torch form for
training; both compute the same float32 values (tests/test_data.py checks them bit for bit).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from erde.errors import ErdeError

_GREY_MODES = ("1", "L", "LA", "La")
_UINT16_MAX = 65535


def check_channels(channels: int) -> None:
    """Image files give 1 or 3 channels; a model trained on other arrays cannot read them."""
    if channels not in (1, 3):
        raise ErdeError(
            f"the model takes {channels}-channel images, but image files only give grey (1) "
            "or colour (3) channels; feed it arrays in the training format instead"
        )


def decode_image(
    path: str | Path, channels: int | None = None, size: int | None = None, crop: float = 1.0
) -> np.ndarray:
    """One image file as a uint8 H x W x C array by the module's rules; ErdeError naming it.

    `channels`: the model's (1 or 3), or None for the file's own (1 for grey, 3 otherwise);
    `size`: bring to size x size by `resize_crop` with `crop`, or None to keep the file's size.
    """
    if channels is not None:
        check_channels(channels)
    img = _eight_bit(_open(path), path)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # expands the palette, transparency included
    img = _convert(img, "L" if img.mode in _GREY_MODES else "RGB", path)  # the file's colours
    if channels is not None:
        img = _convert(img, "L" if channels == 1 else "RGB", path)  # the model's
    if size is not None:
        img = _resize_crop(img, size, crop)
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def resized_shorter_side(size: int, crop: float) -> int:
    """What the shorter side is resized to before the centre crop: round(size / crop)."""
    return round(size / crop)


def resize_crop(pixels: np.ndarray, size: int, crop: float = 1.0) -> np.ndarray:
    """uint8 H x W x C -> size x size x C by the evaluation rule: the shorter side resized to
    `resized_shorter_side(size, crop)` (the longer to floor(that * long / short)) with Pillow's
    bilinear filter, antialiased when shrinking; then the centre size x size, its top-left corner
    at floor((H' - size) / 2), floor((W' - size) / 2). The manifest of an export states it."""
    grey = pixels.shape[2] == 1
    img = Image.fromarray(pixels[..., 0] if grey else pixels, "L" if grey else "RGB")
    out = np.asarray(_resize_crop(img, size, crop), dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def _resize_crop(img: Image.Image, size: int, crop: float) -> Image.Image:
    width, height = img.size
    short, target = min(width, height), resized_shorter_side(size, crop)
    if short != target:
        width, height = (
            (target, int(target * height / width))
            if width == short
            else (int(target * width / height), target)
        )
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    if (width, height) == (size, size):
        return img
    left, top = (width - size) // 2, (height - size) // 2
    return img.crop((left, top, left + size, top + size))


def _open(path: str | Path) -> Image.Image:
    """The decoded image; Pillow's exceptions and its bomb warning become one-line ErdeErrors.
    A pipe or device is refused by its type before it is opened (reading one can block)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ErdeError(
                f"{path}: not a regular file (a folder, pipe, device or socket); give image files"
            )
        with warnings.catch_warnings(), _quiet_pillow_log():
            warnings.simplefilter("ignore")  # Pillow's notes on damaged metadata: one line, below
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format == "TIFF":
                    with _quiet_stderr():  # libtiff writes its complaints to stderr from C
                        img.load()
                else:
                    img.load()
        return img
    except FileNotFoundError:
        raise ErdeError(f"{path}: no such file; check the path") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ErdeError(
            f"{path}: refused as a possible decompression bomb ({exc}); shrink the image below "
            f"{Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS)"
        ) from None
    except ErdeError:
        raise
    except Exception as exc:  # a damaged file fails in its decoder's own way: OSError,
        # SyntaxError, NotImplementedError from a DDS header's pixel format, ...
        raise ErdeError(
            f"{path}: cannot decode the image ({type(exc).__name__}: {exc}); replace it with "
            "a readable PNG, JPEG or other Pillow-supported file"
        ) from None


_PILLOW_LOG = logging.getLogger("PIL")
_QUIET = threading.Lock()
_quiet = {"decodes": 0, "level": logging.NOTSET}  # decodes under way; the level to restore


@contextmanager
def _quiet_pillow_log() -> Iterator[None]:
    """Pillow's log records off for the block: with no handler configured, Python prints them
    to stderr (a damaged TIFF header logs "More samples per pixel than can be decoded"), beside
    the one-line message that already names the damage. The first of concurrent decodes (a
    streaming loader's threads) raises the level, the last restores it."""
    with _QUIET:
        if _quiet["decodes"] == 0:
            _quiet["level"] = _PILLOW_LOG.level
            _PILLOW_LOG.setLevel(logging.CRITICAL + 1)
        _quiet["decodes"] += 1
    try:
        yield
    finally:
        with _QUIET:
            _quiet["decodes"] -= 1
            if _quiet["decodes"] == 0:
                _PILLOW_LOG.setLevel(_quiet["level"])


_STDERR = threading.Lock()  # one redirection at a time: each restores the real descriptor


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 points to the null device for the block: libtiff prints lines such as
    "tempfile.tif: Using code not yet in table." there, past Python's warnings and our one-line
    message. Only around a TIFF's decode: anything else written meanwhile would be lost too."""
    with _STDERR:
        sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to keep quiet
            yield
            return
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _convert(img: Image.Image, mode: str, path: str | Path) -> Image.Image:
    if img.mode == mode:
        return img
    try:
        return img.convert(mode)
    except ValueError as exc:
        raise ErdeError(
            f"{path}: its {img.mode} pixels cannot be converted to {mode} ({exc}); save it as "
            "an 8-bit grey or RGB image"
        ) from None


def _eight_bit(img: Image.Image, path: str | Path) -> Image.Image:
    """16-bit grey scaled to 8 bits ("L"); floating point refused; other modes unchanged."""
    if img.mode == "F":
        raise ErdeError(
            f"{path}: floating-point images (Pillow mode F) have no one mapping to 8-bit "
            "pixels; save it as an 8- or 16-bit grey or RGB image"
        )
    if not img.mode.startswith("I"):
        return img
    wide = np.asarray(img).astype(np.int64)
    if wide.size and not (wide.min() >= 0 and wide.max() <= _UINT16_MAX):
        raise ErdeError(
            f"{path}: its {img.mode} pixels span {wide.min()}..{wide.max()}, beyond the 16-bit "
            f"range 0..{_UINT16_MAX}; save it as an 8- or 16-bit grey or RGB image"
        )
    # round(v * 255 / 65535) = round(v / 257), exact in integers: v / 257 is never k + 1/2.
    return Image.fromarray(((wide + 128) // 257).astype(np.uint8), "L")


def normalize_array(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 N x H x W x C -> float32 N x C x H x W, normalised as `pixels.Normalize` does:
    (x - 255 mean) * (1 / (255 std)), both constants rounded once from float64, then two float32
    operations, so the values are the same to the bit."""
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[3] != len(mean):
        raise ValueError(f"need uint8 N x H x W x {len(mean)} images, got {images.dtype} "
                         f"{images.shape}")  # fmt: skip
    if len(mean) != len(std):
        raise ValueError(f"mean and std need one value per channel, got {mean} and {std}")
    shift = (np.asarray(mean, np.float64) * 255).astype(np.float32).reshape(1, -1, 1, 1)
    scale = (1 / (np.asarray(std, np.float64) * 255)).astype(np.float32).reshape(1, -1, 1, 1)
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
    x -= shift
    x *= scale
    return x


__all__ = [
    "check_channels",
    "decode_image",
    "normalize_array",
    "resize_crop",
    "resized_shorter_side",
]
