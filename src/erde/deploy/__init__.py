"""Deployment: ONNX export (pieces, one If-chained graph, int8), a runtime that stops per image, and
its latency benchmark.

The names below are imported on first use (PEP 562), so that importing a light submodule
(`erde.cli.deploy` for `erde --help`) does not load PyTorch and ONNX.
"""

from __future__ import annotations

from erde import lazy_names

# name -> module that defines it
_LAZY = {
    "Benchmark": "erde.deploy.latency",
    "EarlyExitRuntime": "erde.deploy.runtime",
    "FileResult": "erde.deploy.runtime",
    "Manifest": "erde.deploy.manifest",
    "Prediction": "erde.deploy.runtime",
    "benchmark": "erde.deploy.latency",
    "export_run": "erde.deploy.export",
    "read_manifest": "erde.deploy.manifest",
    "render_benchmark": "erde.deploy.latency",
}

__getattr__, __dir__ = lazy_names(__name__, _LAZY)

__all__ = list(_LAZY)
