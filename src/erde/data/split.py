"""Seeded, exactly stratified hold-outs: the validation split (thresholds are calibrated on
validation) and the test split of data sets that come without one.

Stratified as scikit-learn's `train_test_split(..., stratify=y)`: every class keeps its share;
a size is a count (an integer) or a fraction of the images (a float below 1), as there.
"""

from __future__ import annotations

import torch

from erde.errors import ErdeError

# Data sets without an official test split (digits, an image folder of root/<class>/) hold out
# this fraction by default, always with this seed (never the run's): the test images are the same
# for every run, so results of different seeds stay comparable.
TEST_FRACTION = 0.2
TEST_SPLIT_SEED = 0


def config_size(value: float) -> int | float:
    """A size key as the config holds it (a float) read as a count from 1 up, else a fraction."""
    return int(value) if value >= 1 else float(value)


def _val_count(val_size: int | float, n: int, key: str) -> int:
    """A float is a fraction of n (so 1.0 is never read as one sample); an int is a count."""
    if isinstance(val_size, float) and 0.0 <= val_size < 1.0:
        return round(val_size * n)
    if isinstance(val_size, int) and not isinstance(val_size, bool) and val_size >= 0:
        return val_size
    raise ErdeError(
        f"{key} {val_size!r} is neither a count (an integer >= 0) nor a fraction in [0, 1); "
        "use e.g. 5000 or 0.1."
    )


def stratified_split(
    y: torch.Tensor, val_size: int | float, seed: int, *, key: str = "val_size"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept indices, held-out indices), both sorted; every class keeps its share of the data.
    `key` names the size in messages (e.g. data.test_size).

    Per-class validation counts are the largest-remainder rounding of val_count * class share,
    so they sum to exactly val_count; which members go to validation depends only on `seed`.
    """
    y = torch.as_tensor(y).reshape(-1)
    n = len(y)
    n_val = _val_count(val_size, n, key)
    if n_val >= n:
        raise ErdeError(
            f"{key}={val_size:g} asks for {n_val} of {n} images, leaving none for training; "
            f"choose a smaller count, or a fraction of the images (e.g. {key}=0.1)"
        )
    if n_val == 0:
        return torch.arange(n), torch.empty(0, dtype=torch.int64)
    _, labels, counts = torch.unique(y, return_inverse=True, return_counts=True)
    quota = counts.to(torch.float64) * n_val / n
    take = quota.floor().to(torch.int64)
    remainder = quota - take
    # Largest fractional parts first; ties go to the lower class index (stable sort).
    order = torch.sort(remainder, descending=True, stable=True).indices
    take[order[: n_val - int(take.sum())]] += 1

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    grouped = perm[torch.sort(labels[perm], stable=True).indices]  # by class, shuffled within
    cls = labels[grouped]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[cls]
    in_val = rank < take[cls]
    return grouped[~in_val].sort().values, grouped[in_val].sort().values


def stratified_subset(
    y: torch.Tensor, size: int | float, seed: int, *, key: str = "train_size"
) -> torch.Tensor:
    """Sorted indices of a seeded, stratified `size` of `y` (a count, or a fraction below 1)."""
    n = len(torch.as_tensor(y).reshape(-1))
    count = _val_count(size, n, key)
    if count > n:
        raise ErdeError(
            f"{key}={size:g} asks for more than the {n} images there are; give at most {n}, "
            f"or a fraction of them (e.g. {key}=0.1)"
        )
    if count == 0:
        raise ErdeError(f"{key}={size:g} of {n} images holds none; raise it")
    return torch.arange(n) if count == n else stratified_split(y, count, seed, key=key)[1]
