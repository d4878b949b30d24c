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

import numpy as np
import torch

from erde.data.pixels import Normalize
from erde.errors import ErdeError
from erde.run.model_info import ModelInfo

NORMALISED = (torch.float32, torch.float16, torch.bfloat16)


def model_input(
    images: np.ndarray | torch.Tensor, info: ModelInfo, normalise: Normalize
) -> torch.Tensor:
    """The float32 N x C x H x W batch of `images` by the module's rule; one ErdeError line
    saying what to pass otherwise. `normalise` is the model's (made once by the caller)."""
    try:
        x = torch.as_tensor(images)
    except (TypeError, ValueError, RuntimeError):
        raise ErdeError(
            f"the images are a {type(images).__name__} that is no array of numbers; "
            f"{_what_to_pass(info)}"
        ) from None
    dtype = str(x.dtype).removeprefix("torch.")
    if x.dtype != torch.uint8 and x.dtype not in NORMALISED:
        raise ErdeError(
            f"got {dtype} images; {_what_to_pass(info)} (0..255 pixels: .astype(np.uint8); "
            "normalised values: .astype(np.float32))"
        )
    x = _channels_first(x, info)
    if x.dtype == torch.uint8:
        return normalise(x.contiguous())
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ErdeError(
            f"the images hold {int((~torch.isfinite(x)).sum())} NaN or infinite values; give "
            "finite normalised values (or uint8 pixels)"
        )
    return x.contiguous()


def _channels_first(x: torch.Tensor, info: ModelInfo) -> torch.Tensor:
    """N x C x H x W of a batch in one of the layouts the module allows (uint8 has three)."""
    c, s = info.data.in_channels, info.data.input_size
    if tuple(x.shape[1:]) == (c, s, s) and x.dim() == 4:
        return x
    if x.dtype == torch.uint8 and x.dim() == 4 and tuple(x.shape[1:]) == (s, s, c):
        return x.permute(0, 3, 1, 2)
    if x.dtype == torch.uint8 and x.dim() == 3 and c == 1 and tuple(x.shape[1:]) == (s, s):
        return x[:, None]
    raise ErdeError(
        f"got {str(x.dtype).removeprefix('torch.')} images of shape {tuple(x.shape)}; "
        f"{_what_to_pass(info)}; image files of any size: predict_files or classify_files"
    )


def _what_to_pass(info: ModelInfo) -> str:
    c, s = info.data.in_channels, info.data.input_size
    grey = f", N x {s} x {s}" if c == 1 else ""
    return (
        f"{info.name} reads uint8 pixels (N x {s} x {s} x {c}, N x {c} x {s} x {s}{grey}) "
        f"or normalised float32 N x {c} x {s} x {s}"
    )
