"""Data: sources (formats, download, integrity), seeded splits, on-device batching."""

from erde.data.batches import DeviceBatches
from erde.data.image_data import ImageData
from erde.data.sources import SOURCES, load_source
from erde.data.split import stratified_split

__all__ = ["SOURCES", "DeviceBatches", "ImageData", "load_source", "stratified_split"]
