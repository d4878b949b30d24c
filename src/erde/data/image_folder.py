"""An image folder in either layout, decoded once into uint8 arrays (or listed by
`folder_samples` for streaming, `erde.data.stream`):

- `root/<class>/<image>`, the layout of torchvision's `ImageFolder` and Hugging Face's
  `imagefolder`: a seeded, stratified `data.test_size` of every class is held out for testing
  (`erde.data.split`, the same images for every run seed);
- `root/train/<class>/<image>` and `root/test/<class>/<image>`: the folder's own split, read
  whenever `root` holds a `train` or a `test` folder.

Files are decoded by `erde.data.pixels.decode_image`, the decoder `erde infer` uses, so a model
sees the same pixels from a file in training and in deployment. The set is grey (1 channel) when
every file is grey, else colour (3 channels, grey files repeated into R, G and B).

torchvision's folder helpers are imported where they are used: importing torchvision takes
seconds, which commands that read no image folder should not pay.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from erde.data.image_data import ImageData, build_image_data
from erde.data.pixels import decode_image
from erde.data.split import TEST_FRACTION, TEST_SPLIT_SEED, stratified_split
from erde.data.walk import files_under
from erde.errors import ErdeError

LAYOUT = (
    "root/<class>/<image> (a seeded data.test_size held out for testing), or "
    "root/train/<class>/<image> and root/test/<class>/<image> (png, jpg, ...)"
)
SPLIT_FOLDERS = ("train", "test")


def _classes(split_dir: str) -> list[str]:
    from torchvision.datasets.folder import find_classes

    if not os.path.isdir(split_dir):
        raise ErdeError(f"imagefolder: {split_dir} is not a folder; expected the layout {LAYOUT}.")
    try:
        return find_classes(split_dir)[0]
    except FileNotFoundError as exc:
        raise ErdeError(
            f"imagefolder: {split_dir} has no class folders; expected the layout {LAYOUT}."
        ) from exc


def _samples(split_dir: str, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) of every image, walked by `files_under`: link loops end, pipes refused."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    samples = []
    for cls, label in sorted(class_to_idx.items(), key=lambda item: item[1]):
        folder = os.path.join(split_dir, cls)
        samples += [(path, label) for path in files_under(folder, IMG_EXTENSIONS)]
    found = {label for _, label in samples}
    empty = [c for c, k in class_to_idx.items() if k not in found]
    if empty:
        raise ErdeError(
            f"imagefolder: class folder(s) {', '.join(empty)} in {split_dir} hold no images "
            f"(accepted: {', '.join(IMG_EXTENSIONS)}); add images or remove the folder(s)."
        )
    return samples


def decode_file(path: str, channels: int | None = None, size: int | None = None) -> np.ndarray:
    """`decode_image` with the message saying which loader failed: H x W x 1 for grey files,
    H x W x 3 for the others (or `channels`)."""
    try:
        return decode_image(path, channels, size)
    except ErdeError as exc:
        raise ErdeError(f"imagefolder: {exc}") from None


def folder_samples(
    root: str, test_size: int | float | None = None
) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """The class names (subfolders, sorted) and the (path, label) of every image of the train
    and test splits, without reading any image. `test_size` (default `TEST_FRACTION`) is the
    hold-out of a `root/<class>/` folder; a folder with its own train/test split refuses it."""
    if os.path.isdir(root) and any(os.path.isdir(os.path.join(root, s)) for s in SPLIT_FOLDERS):
        if test_size is not None:
            raise ErdeError(
                f"data.test_size={test_size:g} holds images out of a root/<class>/ folder, but "
                f"{root} has its own train/ and test/ folders, whose test images are used; drop "
                "data.test_size"
            )
        return _split_samples(root)
    return _held_out_samples(root, TEST_FRACTION if test_size is None else test_size)


def _held_out_samples(
    root: str, test_size: int | float
) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """root/<class>/: a stratified test hold-out with a fixed seed, as digits has."""
    classes = _classes(root)
    samples = _samples(root, {c: k for k, c in enumerate(classes)})
    labels = torch.tensor([label for _, label in samples])
    train_idx, test_idx = stratified_split(labels, test_size, TEST_SPLIT_SEED, key="data.test_size")
    if len(test_idx) == 0:
        raise ErdeError(
            f"imagefolder: data.test_size={test_size:g} of the {len(samples)} images in {root} "
            "holds none out for testing; raise it (a count >= 1, or a fraction that holds at "
            "least one image)"
        )
    untrained = sorted(set(labels[test_idx].tolist()) - set(labels[train_idx].tolist()))
    if untrained:
        names = ", ".join(classes[k] for k in untrained)
        raise ErdeError(
            f"imagefolder: data.test_size={test_size:g} holds out every image of class(es) "
            f"{names} in {root}, leaving none to train on; add images to them or lower "
            "data.test_size"
        )
    return classes, {
        "train": [samples[i] for i in train_idx.tolist()],
        "test": [samples[i] for i in test_idx.tolist()],
    }


def _split_samples(root: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """root/train/<class>/ and root/test/<class>/ (test may hold a subset of the classes)."""
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
    classes = _classes(train_dir)
    class_to_idx = {c: k for k, c in enumerate(classes)}
    unknown = sorted(set(_classes(test_dir)) - set(classes))
    if unknown:
        raise ErdeError(
            f"imagefolder: {test_dir} has class folder(s) {', '.join(unknown)} that "
            f"{train_dir} lacks; every test class needs training images."
        )
    test_classes = {c: class_to_idx[c] for c in _classes(test_dir)}
    return classes, {
        "train": _samples(train_dir, class_to_idx),
        "test": _samples(test_dir, test_classes),
    }


def load_image_folder(root: str, test_size: int | float | None = None) -> ImageData:
    """Every image decoded into memory; all must share one size."""
    classes, splits = folder_samples(root, test_size)
    decoded: dict[str, list[np.ndarray]] = {}
    first: tuple[str, tuple[int, int]] | None = None
    for split, samples in splits.items():
        decoded[split] = []
        for path, _ in samples:
            image = decode_file(path)
            if first is None:
                first = (path, image.shape[:2])
            elif image.shape[:2] != first[1]:
                raise ErdeError(
                    f"imagefolder: {path} is {image.shape[1]}x{image.shape[0]} (WxH) but "
                    f"{first[0]} is {first[1][1]}x{first[1][0]}; all images must share one size. "
                    "Resize them beforehand, or stream them (data.stream=always), which resizes "
                    "them as it reads them."
                )
            decoded[split].append(image)
    channels = max(im.shape[2] for images in decoded.values() for im in images)

    def stack(images: list[np.ndarray]) -> np.ndarray:
        # Repeating grey into R, G and B is what Pillow's L -> RGB conversion does.
        return np.stack([np.repeat(im, channels // im.shape[2], axis=2) for im in images])

    arrays = {
        split: (stack(decoded[split]), np.array([label for _, label in splits[split]]))
        for split in splits
    }
    return build_image_data(
        "imagefolder", arrays["train"], arrays["test"], classes=classes, hflip=True
    )
