"""Arrays given to the Python API to the float32 N x C x H x W batch a model reads, by one rule,
so `EarlyExitModel` and `EarlyExitRuntime` read the same array the same way:

- uint8: raw pixels, N x H x W x C (as decoded), N x C x H x W, or N x H x W for a one-channel
  model; normalised here with the model's mean and std, as in training.
- float32, float16, bfloat16: already normalised, N x C x H x W.
- anything else is refused, with the conversion to make: other integers (0..255 pixels in
  int64, say) and float64 (numpy's default, as likely raw 0..255 values as normalised ones)
  cannot be told apart from what they are not, and bool or complex arrays are no images.

Non-finite values are refused as well: a NaN pixel makes NaN logits, whose argmax is class 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from erde.data.decode import normalize_array
from erde.errors import ErdeError
from erde.run.model_info import ModelInfo

NORMALISED = ("float32", "float16", "bfloat16")


def model_input(images: Any, info: ModelInfo) -> np.ndarray:
    """The float32 N x C x H x W batch of `images` (a numpy array or a torch tensor on any
    device, converted without importing torch here) by the module's rule; one ErdeError line
    saying what to pass otherwise."""
    x, dtype = _as_array(images, info)
    if dtype != "uint8" and dtype not in NORMALISED:
        raise ErdeError(
            f"got {dtype} images; {_what_to_pass(info)} (0..255 pixels: .astype(np.uint8); "
            "normalised values: .astype(np.float32))"
        )
    x = _channels_last(x, info) if dtype == "uint8" else _channels_first(x, dtype, info)
    if dtype == "uint8":
        return normalize_array(np.ascontiguousarray(x), info.data.mean, info.data.std)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ErdeError(
            f"the images hold {int((~np.isfinite(x)).sum())} NaN or infinite values; give "
            "finite normalised values (or uint8 pixels)"
        )
    return x


def _as_array(images: Any, info: ModelInfo) -> tuple[np.ndarray, str]:
    """A numpy view or copy and the dtype's name as the caller gave it (a bfloat16 tensor,
    which numpy cannot hold, comes as float32)."""
    if type(images).__module__.startswith("torch"):
        dtype = str(images.dtype).removeprefix("torch.")
        tensor = images.detach().cpu()
        images = (tensor.float() if dtype == "bfloat16" else tensor).numpy()
        return images, dtype
    try:
        x = np.asarray(images)
    except (TypeError, ValueError):
        x = np.asarray(None)
    if x.dtype == object:
        raise ErdeError(
            f"the images are a {type(images).__name__} that is no array of numbers; "
            f"{_what_to_pass(info)}"
        )
    return x, x.dtype.name


def _channels_last(x: np.ndarray, info: ModelInfo) -> np.ndarray:
    """N x H x W x C uint8 pixels from one of the three layouts the module allows."""
    c, s = info.data.in_channels, info.data.input_size
    if x.ndim == 4 and x.shape[1:] == (c, s, s):  # first, as for float batches
        return x.transpose(0, 2, 3, 1)
    if x.ndim == 4 and x.shape[1:] == (s, s, c):
        return x
    if x.ndim == 3 and c == 1 and x.shape[1:] == (s, s):
        return x[..., None]
    raise _bad_shape(x, "uint8", info)


def _channels_first(x: np.ndarray, dtype: str, info: ModelInfo) -> np.ndarray:
    c, s = info.data.in_channels, info.data.input_size
    if x.ndim == 4 and x.shape[1:] == (c, s, s):
        return x
    raise _bad_shape(x, dtype, info)


def _bad_shape(x: np.ndarray, dtype: str, info: ModelInfo) -> ErdeError:
    return ErdeError(
        f"got {dtype} images of shape {tuple(x.shape)}; {_what_to_pass(info)}; image files of "
        "any size: predict_files or classify_files"
    )


def _what_to_pass(info: ModelInfo) -> str:
    c, s = info.data.in_channels, info.data.input_size
    grey = f", N x {s} x {s}" if c == 1 else ""
    return (
        f"{info.name} reads uint8 pixels (N x {s} x {s} x {c}, N x {c} x {s} x {s}{grey}) "
        f"or normalised float32 N x {c} x {s} x {s}"
    )
