"""Deployment: ONNX export (pieces, one If-chained graph, int8), a runtime that stops per image, and
its latency benchmark."""

from erde.deploy.export import export_run
from erde.deploy.latency import benchmark, render_benchmark
from erde.deploy.manifest import read_manifest
from erde.deploy.runtime import EarlyExitRuntime, FileResult, Prediction

__all__ = [
    "EarlyExitRuntime",
    "FileResult",
    "Prediction",
    "benchmark",
    "export_run",
    "read_manifest",
    "render_benchmark",
]
