"""scikit-learn's bundled 8x8 handwritten digits: a real data set that needs no download."""

from __future__ import annotations

import torch

from erde.data.image_data import ImageData, build_image_data
from erde.data.split import TEST_FRACTION, TEST_SPLIT_SEED, stratified_split


def load_digits_data() -> ImageData:
    """1,797 grayscale 8x8 images; values 0..16 rescaled to 0..255 (rounded)."""
    from sklearn.datasets import load_digits  # here: importing scikit-learn takes a second

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().to(torch.uint8).unsqueeze(-1)
    y = torch.from_numpy(bunch.target).to(torch.int64)
    train_idx, test_idx = stratified_split(y, TEST_FRACTION, seed=TEST_SPLIT_SEED)
    return build_image_data(
        "digits",
        (x[train_idx].numpy(), y[train_idx].numpy()),
        (x[test_idx].numpy(), y[test_idx].numpy()),
        classes=[str(k) for k in range(10)],
        hflip=False,  # a mirrored 2 is not a 2
    )
