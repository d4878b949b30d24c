"""Per-exit logits of a run on its validation and test splits, computed once and stored in the run.

Every analysis (sweeps, calibration, reports, comparisons) reads this cache and never runs the model
again. The cache records the SHA-256 of the weights it came from, so a stale or foreign cache
is caught.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from erde import checkpoint as ckpt
from erde.config import load_config
from erde.data import DeviceBatches
from erde.data.prepare import prepare_data
from erde.device import resolve_device
from erde.errors import ErdeError
from erde.files import sha256_file, write_bytes
from erde.rundir import RunDir

SPLITS = ("val", "test")


@dataclass
class LogitsCache:
    """What every analysis reads instead of running the model again."""

    logits: dict[str, torch.Tensor]  # split -> N x E x K, float32
    labels: dict[str, torch.Tensor]  # split -> N, int64
    exit_macs: list[int]
    weights_sha256: str


@torch.no_grad()
def collect_logits(
    model: torch.nn.Module, batches: DeviceBatches
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit's logits (N x E x K, float32, on the CPU) and the labels of one split."""
    outs, labels = [], []
    for x, y in batches:
        outs.append(torch.stack(model(x), dim=1).float().cpu())
        labels.append(y.cpu())
    return torch.cat(outs), torch.cat(labels)


def build_cache(run_dir: str | Path, device: str = "auto") -> LogitsCache:
    """One pass of the run's model over its own validation split and the test split."""
    run = RunDir(run_dir)
    model, info = ckpt.load_model(run)
    cfg = load_config(str(run.config))
    dev = resolve_device(device)
    model.to(dev)
    split = prepare_data(cfg)
    data = split.data
    parts = {"val": split.val, "test": split.test}
    logits, labels = {}, {}
    for name, (x, y) in parts.items():
        if len(y) == 0:
            raise ErdeError(
                f"run {run} has an empty {name} split; thresholds are chosen on "
                "validation data, so train with data.val_size > 0"
            )
        batches = DeviceBatches(
            x, y, batch_size=cfg.train.eval_batch_size, mean=data.mean, std=data.std, device=dev
        )
        logits[name], labels[name] = collect_logits(model, batches)
    return LogitsCache(logits, labels, list(info.exit_macs), sha256_file(run.weights))


def save_cache(path: Path, cache: LogitsCache) -> None:
    """The cache as one safetensors file; the weights' digest and exit costs in its metadata."""
    tensors = {f"{s}/logits": cache.logits[s].contiguous() for s in SPLITS}
    tensors.update({f"{s}/labels": cache.labels[s].contiguous() for s in SPLITS})
    metadata = {"weights_sha256": cache.weights_sha256, "exit_macs": json.dumps(cache.exit_macs)}
    # Serialised in memory, written by erde: a full disk is a clear message, not a traceback.
    write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def read_cache(path: Path) -> LogitsCache:
    """A cache file, refused with a clear message when it is damaged or incomplete."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        cache = LogitsCache(
            {s: tensors[f"{s}/logits"] for s in SPLITS},
            {s: tensors[f"{s}/labels"] for s in SPLITS},
            json.loads(metadata["exit_macs"]),
            metadata["weights_sha256"],
        )
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise ErdeError(
            f"logits cache {path} is unreadable or incomplete ({exc}); delete it and evaluate again"
        ) from None
    return cache


def load_cache(run_dir: str | Path, *, refresh: bool = False, device: str = "auto") -> LogitsCache:
    """The run's cache, built on first use; refused when it came from other weights."""
    run = RunDir(run_dir)
    path = run.logits
    if path.is_file() and not refresh:
        ckpt.load_weights(run)  # the clear message when the weights are missing or corrupt
        cache = read_cache(path)
        if cache.weights_sha256 != sha256_file(run.weights):
            raise ErdeError(
                f"logits cache {path} was computed from other weights than "
                f"{run.weights} (another model or an earlier epoch); "
                "pass --refresh to recompute it"
            )
        return cache
    cache = build_cache(run, device)
    save_cache(path, cache)
    return cache
