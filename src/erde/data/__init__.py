"""Data: sources (formats, download, integrity), seeded splits, on-device batching.

The names below are imported on first use (PEP 562), so that the ONNX runtime can import
`erde.data.decode` (numpy and Pillow) without loading PyTorch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# name -> module that defines it
_LAZY = {
    "DeviceBatches": "erde.data.batches",
    "ImageData": "erde.data.image_data",
    "SOURCES": "erde.data.sources",
    "load_source": "erde.data.sources",
    "stratified_split": "erde.data.split",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'erde.data' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = list(_LAZY)
