"""Data: sources (formats, download, integrity), seeded splits, on-device batching.

The names below are imported on first use (PEP 562), so that the ONNX runtime can import
`erde.data.decode` (numpy and Pillow) without loading PyTorch.
"""

from __future__ import annotations

from erde import lazy_names

# name -> module that defines it
_LAZY = {
    "DeviceBatches": "erde.data.batches",
    "ImageData": "erde.data.image_data",
    "SOURCES": "erde.data.sources",
    "load_source": "erde.data.sources",
    "stratified_split": "erde.data.split",
}

__getattr__, __dir__ = lazy_names(__name__, _LAZY)

__all__ = list(_LAZY)
