"""One entry point that turns a source name (and folder) into validated `ImageData`."""

from __future__ import annotations

import os

from erde.data.digits import load_digits_data
from erde.data.image_data import ImageData
from erde.data.image_folder import LAYOUT, load_image_folder
from erde.data.npz import FORMAT, load_npz
from erde.data.official import OFFICIAL, load_official
from erde.errors import ErdeError

SOURCES = ("cifar10", "cifar100", "svhn", "digits", "npz", "imagefolder")

# Where the official archives are looked for (and downloaded to) when no root is given.
DEFAULT_ROOT = "data"


def load_source(
    name: str,
    root: str | None = None,
    *,
    download: bool = False,
    verify: bool = True,
    test_size: int | float | None = None,
) -> ImageData:
    """Load a data set by name.

    cifar10/cifar100/svhn: `root` is the folder torchvision downloads into (default ./data);
    `verify` checks the official md5 sums. digits: bundled with scikit-learn, `root` unused; its
    test split is a stratified 20 % drawn with a fixed seed, the same for every run seed.
    npz / imagefolder: `root` is required; `download` and `verify` do not apply. `test_size`
    (a count, or a fraction below 1) is the test hold-out of an image folder without a
    train/test split (`erde.data.image_folder`); no other source takes it.
    """
    root = os.path.expanduser(root) if root else root
    if test_size is not None and name != "imagefolder":
        raise ErdeError(
            f"data.test_size={test_size:g} holds test images out of an image folder "
            f"(data.source=imagefolder); {name} comes with its own test split: drop "
            "data.test_size"
        )
    if name in OFFICIAL:
        return load_official(name, root or DEFAULT_ROOT, download=download, verify=verify)
    if name == "digits":
        return load_digits_data()
    if name in ("npz", "imagefolder"):
        if not root:
            expected = (
                f"train.npz and test.npz ({FORMAT})" if name == "npz" else f"the layout {LAYOUT}"
            )
            raise ErdeError(f"{name}: no folder given; set data.root to a folder with {expected}.")
        return load_npz(root) if name == "npz" else load_image_folder(root, test_size)
    raise ErdeError(f"unknown data source {name!r}; choose one of {', '.join(SOURCES)}.")
