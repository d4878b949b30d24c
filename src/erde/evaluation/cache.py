"""Per-exit logits of a run on its validation and test splits, computed once and stored in the run.

Every analysis (sweeps, calibration, reports, comparisons) reads this cache and never runs the model
again. The cache records the SHA-256 of the weights it came from, so a stale or foreign cache
is caught.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from erde.config.schema import load_config
from erde.data import DeviceBatches
from erde.data.prepare import eval_batches, prepare_data
from erde.device import resolve_device
from erde.errors import ErdeError
from erde.files import write_bytes
from erde.models.load import load_run_model
from erde.run import checkpoint as ckpt
from erde.run.formats import ExitMacs
from erde.run.layout import RunDir

log = logging.getLogger(__name__)

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
    model, info, digest = load_run_model(run)  # the digest of the bytes the logits come from
    cfg = load_config(str(run.config), recorded=True)
    dev = resolve_device(device)
    model.to(dev)
    split = prepare_data(cfg)
    logits, labels = {}, {}
    for name in ("val", "test"):  # the training engine's own eval batches: in memory or streamed
        logits[name], labels[name] = collect_logits(model, eval_batches(cfg, split, name, dev))
    return LogitsCache(logits, labels, list(info.exit_macs), digest)


def save_cache(path: Path, cache: LogitsCache) -> None:
    """The cache as one safetensors file; the weights' digest and exit costs in its metadata."""
    tensors = {f"{s}/logits": cache.logits[s].contiguous() for s in SPLITS}
    tensors.update({f"{s}/labels": cache.labels[s].contiguous() for s in SPLITS})
    metadata = {
        "weights_sha256": cache.weights_sha256,
        "exit_macs": json.dumps(cache.exit_macs),
        "content_sha256": content_digest(tensors),
    }
    # Serialised in memory, written by erde: a full disk is a clear message, not a traceback.
    write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes: a value altered inside an
    otherwise well-formed file is caught, not reported as a result."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
        if metadata["content_sha256"] != content_digest(tensors):
            raise ValueError("its contents do not match the digest it records")
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise ErdeError(
            f"logits cache {path} is unreadable or incomplete ({exc}); delete it and evaluate again"
        ) from None
    problem = cache_problem(cache)
    if problem:
        raise ErdeError(f"logits cache {path} is damaged: {problem}; delete it and evaluate again")
    return cache


_EXIT_MACS = TypeAdapter(ExitMacs)


def cache_problem(cache: LogitsCache, num_exits: int | None = None) -> str | None:
    """What makes a cache unusable (the field named), or None: the schema of the file kind."""
    macs = cache.exit_macs
    try:
        _EXIT_MACS.validate_python(macs)  # the rule of model.json, report.json and manifest.json
    except ValidationError:
        return "'exit_macs' is not an increasing list of positive whole numbers, one per exit"
    if not isinstance(cache.weights_sha256, str) or len(cache.weights_sha256) != 64:
        return "'weights_sha256' is not a SHA-256 digest"
    for split in SPLITS:
        z, y = cache.logits[split], cache.labels[split]
        if z.dtype != torch.float32 or z.dim() != 3 or z.shape[1] != len(macs) or not len(z):
            return f"'{split}/logits' is not float32 N x {len(macs)} exits x classes"
        if y.dtype != torch.int64 or y.shape != (len(z),):
            return f"'{split}/labels' is not int64 with one label per row of '{split}/logits'"
        if not torch.isfinite(z).all():
            return f"'{split}/logits' holds NaN or infinite values"
        if y.min() < 0 or y.max() >= z.shape[2]:
            return f"'{split}/labels' holds labels outside 0..{z.shape[2] - 1}"
    if num_exits is not None and len(macs) != num_exits:
        return f"'exit_macs' lists {len(macs)} exits but the model has {num_exits}"
    return None


def load_cache(run_dir: str | Path, *, refresh: bool = False, device: str = "auto") -> LogitsCache:
    """The run's cache, built on first use (and stored where the run folder is writable);
    refused when it came from other weights."""
    run = RunDir(run_dir)
    path = run.logits
    weights = ckpt.read_weights(run)  # the clear message for missing or corrupt weights
    info = weights.info
    ckpt.check_finished(run.path, info, "run", "evaluating it")
    if path.is_file() and not refresh:
        cache = read_cache(path)
        if cache.weights_sha256 != weights.sha256:
            raise ErdeError(
                f"logits cache {path} was computed from other weights than "
                f"{run.weights} (another model or an earlier epoch); "
                "pass --refresh to recompute it"
            )
        problem = cache_problem(cache, info.num_exits)
        if problem:
            raise ErdeError(f"logits cache {path} does not fit {run.sidecar}: {problem}")
        return cache
    cache = build_cache(run, device)
    try:
        save_cache(path, cache)
    except ErdeError as exc:  # a read-only run (a shared teacher): the cache only saves time
        log.warning("logits cache not stored, so the next evaluation computes it again: %s", exc)
    return cache
