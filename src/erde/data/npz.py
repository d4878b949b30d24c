"""A directory with train.npz and test.npz: the simplest way to bring one's own arrays."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from erde.data.image_data import ImageData, build_image_data
from erde.errors import ErdeError

FORMAT = (
    "each file holds `x` (uint8, N x H x W x C, C = 1 or 3), `y` (integer class indices, N) and "
    "optionally `label_names` (strings)"
)


def _read(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise ErdeError(
            f"npz: {path} does not exist. The npz source needs a folder with train.npz and "
            f"test.npz; {FORMAT}. Point data.root at that folder."
        )
    if not zipfile.is_zipfile(path):
        # np.load would try it as a pickle and suggest allow_pickle=True: advice never to follow.
        raise ErdeError(
            f"npz: {path} is not an .npz archive; write it with numpy.savez (or savez_compressed) "
            f"using plain (non-object) arrays: {FORMAT}."
        )
    try:
        # allow_pickle=False: an .npz must never run code while being read.
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ErdeError(
            f"npz: cannot read {path} ({type(exc).__name__}: {exc}); write it with numpy.savez "
            f"using plain (non-object) arrays: {FORMAT}."
        ) from exc
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ErdeError(
            f"npz: {path} lacks the key(s) {', '.join(missing)} (it has {', '.join(arrays)}); "
            f"{FORMAT}."
        )
    return arrays


def load_npz(root: str) -> ImageData:
    """Load `root`/train.npz and `root`/test.npz; class names from train's `label_names`."""
    train, test = _read(os.path.join(root, "train.npz")), _read(os.path.join(root, "test.npz"))
    names = train.get("label_names")
    classes = None if names is None else [str(n) for n in names.reshape(-1)]
    return build_image_data(
        "npz", (train["x"], train["y"]), (test["x"], test["y"]), classes=classes, hflip=True
    )
