"""root/train/<class>/*.png and root/test/<class>/*.png, decoded once into uint8 arrays (or
listed by `folder_samples` for streaming, `erde.data.stream`).

Files are decoded by `erde.data.pixels.decode_image`, the decoder `erde infer` uses, so a model
sees the same pixels from a file in training and in deployment. The set is grey (1 channel) when
every file is grey, else colour (3 channels, grey files repeated into R, G and B).

torchvision's folder helpers are imported where they are used: importing torchvision takes
seconds, which commands that read no image folder should not pay.
"""

from __future__ import annotations

import os

import numpy as np

from erde.data.image_data import ImageData, build_image_data
from erde.data.pixels import decode_image
from erde.data.walk import files_under
from erde.errors import ErdeError

LAYOUT = "root/train/<class>/<image> and root/test/<class>/<image> (png, jpg, ...)"


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


def folder_samples(root: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """The class names (the train folder's subfolders, sorted; test may hold a subset of them)
    and the (path, label) of every image of each split, without reading any image."""
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


def load_image_folder(root: str) -> ImageData:
    """Every image decoded into memory; all must share one size."""
    classes, splits = folder_samples(root)
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
