"""A small, reproducible CIFAR-10 subset (train.npz / test.npz, under 40 MB) for quick checks.

Takes the first `--train-per-class` training images and the first `--test-per-class` test images
of every class, in the original order (no randomness: the same files from the same source,
always), and writes them in the npz layout `erde` reads (`x` uint8 N x 32 x 32 x 3, `y`,
`label_names`). Run from the repository root:

    python bench/make_cifar_subset.py --root ../shared/data/cifar10 --out .devdata/cifar10-small

The printed content digest (SHA-256 of the x and y bytes) identifies the subset; the .npz files
themselves carry zip timestamps and so differ byte-wise between runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import numpy as np

DEFAULT_ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")


def first_per_class(y: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` samples of each class, in their original order."""
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)])
    return np.sort(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder with the full train/test.npz")
    parser.add_argument("--out", default=".devdata/cifar10-small")
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    digest = hashlib.sha256()
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        with np.load(os.path.join(args.root, f"{split}.npz"), allow_pickle=False) as f:
            x, y, names = f["x"], f["y"], f["label_names"]
        keep = first_per_class(y, per_class)
        path = os.path.join(args.out, f"{split}.npz")
        np.savez_compressed(path, x=x[keep], y=y[keep], label_names=names)
        digest.update(x[keep].tobytes())
        digest.update(y[keep].tobytes())
        print(f"{path}: {len(keep)} images, {os.path.getsize(path) / 1e6:.1f} MB")
    print(f"content sha256: {digest.hexdigest()}")


if __name__ == "__main__":
    main()
