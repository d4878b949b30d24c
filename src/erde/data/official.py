"""CIFAR-10, CIFAR-100 and SVHN read from their official archives.

torchvision knows the file names, URLs and md5 sums, downloads the archives and reads SVHN's .mat
files; this module adds the checks that turn "Dataset not found or corrupted" into a message that
says which file and what to do. The CIFAR batches are Python pickles, so erde reads them itself
with an unpickler that builds only data (`erde.data.safe_pickle`): a crafted folder cannot run
code, with or without `verify`. torchvision is imported on first use: it takes seconds to import.
"""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass, replace

import numpy as np

from erde.data.image_data import ImageData, build_image_data
from erde.data.npz import load_npz
from erde.data.safe_pickle import load_arrays_pickle
from erde.errors import ErdeError

OFFICIAL = ("cifar10", "cifar100", "svhn")


@dataclass(frozen=True)
class _Official:
    name: str
    dataset: type  # the torchvision dataset class
    folder: str  # where the files lie, relative to root ("" = root itself)
    files: tuple[tuple[str, str], ...]  # (file name, md5)
    urls: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool


def _cifar(name: str, cls: type, mean: tuple, std: tuple) -> _Official:
    files = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    return _Official(
        name, cls, cls.base_folder, tuple((f, m) for f, m in files), (cls.url,), mean, std, True
    )


@functools.cache
def _specs() -> dict[str, _Official]:
    from torchvision.datasets import CIFAR10, CIFAR100, SVHN

    # Mean/std: the widely used per-channel train-set values (CIFAR std is the population std
    # over all train pixels, not the often-copied 0.2023/0.1994/0.2010 that averages per-image
    # stds).
    return {
        "cifar10": _cifar("cifar10", CIFAR10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        "cifar100": _cifar(
            "cifar100", CIFAR100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
        ),
        "svhn": _Official(
            "svhn",
            SVHN,
            "",
            tuple((SVHN.split_list[s][1], SVHN.split_list[s][2]) for s in ("train", "test")),
            tuple(SVHN.split_list[s][0] for s in ("train", "test")),
            (0.4377, 0.4438, 0.4728),
            (0.1980, 0.2010, 0.1970),
            False,  # mirrored digits are not digits
        ),
    }


def _svhn_without_md5(cls: type) -> type:
    """torchvision's SVHN with md5 sums removed, so its own checks only test that files exist."""
    return type(
        "UnverifiedSVHN",
        (cls,),
        {"split_list": {k: [u, f, None] for k, (u, f, _) in cls.split_list.items()}},
    )


def _unpickle(path: str) -> dict:
    with open(path, "rb") as fh:
        try:
            entry = load_arrays_pickle(fh)
        except pickle.UnpicklingError:
            raise
        except Exception as exc:  # a damaged pickle fails in many ways; all mean the same here
            raise pickle.UnpicklingError(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(entry, dict):
        raise TypeError(f"{os.path.basename(path)} holds a {type(entry).__name__}, not a dict")
    return entry


def _read_cifar(spec: _Official, folder: str) -> tuple[list[tuple], list[str]]:
    """((images NHWC, labels) for train and test, class names) from the python-format batches."""
    cls = spec.dataset
    arrays = []
    for files in (cls.train_list, cls.test_list):
        images, labels = [], []
        for file, _ in files:
            entry = _unpickle(os.path.join(folder, file))
            images.append(np.asarray(entry["data"]).reshape(-1, 3, 32, 32))
            labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        arrays.append((np.concatenate(images).transpose(0, 2, 3, 1), np.asarray(labels)))
    classes = _unpickle(os.path.join(folder, cls.meta["filename"]))[cls.meta["key"]]
    return arrays, [str(c) for c in classes]


def _problems(spec: _Official, folder: str, verify: bool) -> tuple[list[str], list[str]]:
    """(missing files, files whose md5 differs from the official one)."""
    from torchvision.datasets.utils import check_integrity

    missing = [f for f, _ in spec.files if not os.path.isfile(os.path.join(folder, f))]
    bad = []
    if verify:
        bad = [
            f
            for f, md5 in spec.files
            if f not in missing and not check_integrity(os.path.join(folder, f), md5)
        ]
    return missing, bad


def _download(spec: _Official, root: str) -> None:
    os.makedirs(root, exist_ok=True)
    try:
        if spec.name == "svhn":
            for split in ("train", "test"):
                spec.dataset(root, split=split, download=True)
        else:
            spec.dataset(root, train=True, download=True)
    except Exception as exc:  # network failures come in many types; all mean the same here
        raise ErdeError(
            f"{spec.name}: download failed ({type(exc).__name__}: {exc}). Without network, fetch "
            f"{' and '.join(spec.urls)} by hand and "
            f"{'extract it into' if spec.folder else 'put the files in'} {root}."
        ) from exc


def load_official(name: str, root: str, *, download: bool, verify: bool) -> ImageData:
    """Load a torchvision-known dataset from `root` (the folder torchvision would download into),
    or from a `train.npz`/`test.npz` copy of it in `root`."""
    spec = _specs()[name]
    if all(os.path.isfile(os.path.join(root, f)) for f in ("train.npz", "test.npz")):
        # The same images as NumPy arrays (e.g. ../shared/data/cifar10): keep the data set's
        # identity and its well-known statistics.
        data = load_npz(root)
        return replace(data, name=name, mean=spec.mean, std=spec.std, hflip=spec.hflip)
    # Accept the data folder itself as well as its parent (torchvision's notion of root).
    if spec.folder and os.path.basename(os.path.normpath(root)) == spec.folder:
        root = os.path.dirname(os.path.normpath(root))
    folder = os.path.join(root, spec.folder)
    missing, bad = _problems(spec, folder, verify)
    if download and (missing or bad):
        _download(spec, root)
        missing, bad = _problems(spec, folder, verify)
    if missing:
        raise ErdeError(
            f"{name}: {os.path.abspath(folder)} is missing {', '.join(missing)} (expected "
            f"{', '.join(f for f, _ in spec.files)}; a relative data.root is read from "
            f"{os.getcwd()}). A folder with train.npz and test.npz works too "
            f"(data.root=/abs/path/to/it). Download it with download=True "
            f"(data.download=true), or fetch {' and '.join(spec.urls)} and "
            f"{'extract it into' if spec.folder else 'put the files in'} {os.path.abspath(root)}."
        )
    if bad:
        raise ErdeError(
            f"{name}: md5 mismatch for {', '.join(os.path.join(folder, f) for f in bad)}: not the "
            "official file or corrupted. Delete it and download again (download=True / "
            "data.download=true), or pass verify=False (data.verify=false) to use it anyway."
        )
    try:
        if name == "svhn":
            cls = _svhn_without_md5(spec.dataset)  # sums checked above; torchvision need not
            train, test = cls(root, split="train"), cls(root, split="test")
            arrays = [(d.data.transpose(0, 2, 3, 1), d.labels) for d in (train, test)]
            classes = [str(k) for k in range(10)]
        else:
            arrays, classes = _read_cifar(spec, folder)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, OSError) as exc:
        raise ErdeError(
            f"{name}: could not read the files in {folder} ({type(exc).__name__}: {exc}); they "
            "are not in the official format. Delete them and download again (download=True)."
        ) from exc
    return build_image_data(
        name, arrays[0], arrays[1], classes=classes, hflip=spec.hflip, stats=(spec.mean, spec.std)
    )
