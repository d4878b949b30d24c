"""The baseline both data benchmarks compare against: torchvision's per-image PIL pipeline."""

from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms


class PILImages(Dataset):
    """The usual torchvision setup: one PIL image per item, transformed on its own."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: transforms.Compose) -> None:
        self.x, self.y, self.transform = x.numpy(), y.numpy(), transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def cifar_images(x: torch.Tensor, y: torch.Tensor, mean, std) -> PILImages:
    """CIFAR training augmentation, image by image: crop with padding 4, flip, normalise."""
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    return PILImages(x, y, transform)
