"""Per-exit logits of a run on its validation and test splits, computed once and stored in the run.

Every analysis (sweeps, calibration, reports, comparisons) reads this cache and never runs the model
again. The cache records the SHA-256 of the weights it came from, so a stale or foreign cache
is caught.
"""

from __future__ import annotations

import hashlib
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
from erde.errors import ErdeError

CACHE = "logits.safetensors"
SPLITS = ("val", "test")


@dataclass
class LogitsCache:
    logits: dict[str, torch.Tensor]  # split -> N x E x K, float32
    labels: dict[str, torch.Tensor]  # split -> N, int64
    exit_macs: list[int]
    weights_sha256: str


def weights_digest(run_dir: Path) -> str:
    h = hashlib.sha256()
    with open(Path(run_dir) / ckpt.WEIGHTS, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def collect_logits(
    model: torch.nn.Module, batches: DeviceBatches
) -> tuple[torch.Tensor, torch.Tensor]:
    outs, labels = [], []
    for x, y in batches:
        outs.append(torch.stack(model(x), dim=1).float().cpu())
        labels.append(y.cpu())
    return torch.cat(outs), torch.cat(labels)


def build_cache(run_dir: str | Path, device: str = "auto") -> LogitsCache:
    """One pass of the run's model over its own validation split and the test split."""
    from erde.train import prepare_data, resolve_device

    run_dir = Path(run_dir)
    model, meta = ckpt.load_model(run_dir)
    cfg = load_config(str(run_dir / ckpt.CONFIG))
    dev = resolve_device(device)
    model.to(dev)
    split = prepare_data(cfg)
    data = split.data
    parts = {
        "val": (data.train_x[split.val_idx], data.train_y[split.val_idx]),
        "test": (data.test_x, data.test_y),
    }
    logits, labels = {}, {}
    for name, (x, y) in parts.items():
        if len(y) == 0:
            raise ErdeError(
                f"run {run_dir} has an empty {name} split; thresholds are chosen on "
                "validation data, so train with data.val_size > 0"
            )
        batches = DeviceBatches(
            x, y, batch_size=cfg.train.eval_batch_size, mean=data.mean, std=data.std, device=dev
        )
        logits[name], labels[name] = collect_logits(model, batches)
    return LogitsCache(logits, labels, list(meta["exit_macs"]), weights_digest(run_dir))


def save_cache(path: Path, cache: LogitsCache) -> None:
    tensors = {f"{s}/logits": cache.logits[s].contiguous() for s in SPLITS}
    tensors.update({f"{s}/labels": cache.labels[s].contiguous() for s in SPLITS})
    metadata = {"weights_sha256": cache.weights_sha256, "exit_macs": json.dumps(cache.exit_macs)}
    # Serialised in memory, written by erde: a full disk is a clear message, not a traceback.
    ckpt.write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def read_cache(path: Path) -> LogitsCache:
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
    run_dir = Path(run_dir)
    path = run_dir / CACHE
    if path.is_file() and not refresh:
        ckpt.load_weights(run_dir)  # the clear message when the weights are missing or corrupt
        cache = read_cache(path)
        if cache.weights_sha256 != weights_digest(run_dir):
            raise ErdeError(
                f"logits cache {path} was computed from other weights than "
                f"{run_dir / ckpt.WEIGHTS} (another model or an earlier epoch); "
                "pass --refresh to recompute it"
            )
        return cache
    cache = build_cache(run_dir, device)
    save_cache(path, cache)
    return cache
