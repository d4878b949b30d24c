"""The teacher's per-exit logits on every augmented training batch, computed once per epoch and
reused by every student that would compute the same numbers.

With `DeviceBatches` (seed, epoch)-pure, what the frozen teacher outputs at step s of epoch e is
fixed by `CacheKey` (teacher weights and statistics, data split, the student's normalisation,
augmentation, seed, global batch, precision, memory layout, device type). The first student of a
key computes them as usual and stores them (one file per epoch, in the dtype the teacher produced
them: float32, or bfloat16/float16 under autocast, so the loss sees bit for bit what it would
have computed); later students read them.
Precomputing every epoch before the students start (`fill`) makes parallel students free of
the teacher's forward pass.

A file is written whole and renamed into place (readers never see half of it; two students
writing the same epoch at once write the same bytes), and checked when read: its key, shape,
dtype and a SHA-256 of its contents. A file that fails a check is ignored with a log line and
recomputed. Under DDP each rank computes its share of a missing epoch, rank 0 gathers and writes
the global order, and each rank later reads its own rows (rank r of W takes rows r::W of every
global batch, exactly the images `DeviceBatches` gives it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from erde import distributed
from erde.distributed import World
from erde.errors import ErdeError
from erde.files import write_bytes

log = logging.getLogger("erde.train.engine.cache")  # train.log only, below warnings


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines the teacher's outputs on one epoch's training batches.

    Both normalisations are in: the teacher reads the batches renormalised from the student's
    statistics (`mean`, `std`) to its own (`teacher_mean`, `teacher_std`, from its model.json,
    which its weights' digest does not cover)."""

    teacher_sha256: str
    teacher_mean: tuple[float, ...]
    teacher_std: tuple[float, ...]
    source: str
    train_indices_sha256: str  # the split (seed and val_size) and the data's labels
    num_train: int
    batch_size: int  # global
    mean: tuple[float, ...]
    std: tuple[float, ...]
    steps: int
    augment: bool
    crop_padding: int
    hflip: bool
    seed: int
    precision: str
    channels_last: bool
    device_type: str

    @property
    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def indices_digest(indices: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256(indices.to(torch.int64).numpy().tobytes())
    h.update(labels.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


class TeacherCache:
    """One key's folder: `epoch0001.safetensors`, ... each holding `logits` (steps * batch x
    teacher exits x classes, global batch order)."""

    def __init__(self, folder: Path, key: CacheKey) -> None:
        self.folder = Path(folder) / key.digest
        self.key = key
        self._unwritable = False

    def path(self, epoch: int) -> Path:
        return self.folder / f"epoch{epoch + 1:04d}.safetensors"

    def read(self, epoch: int) -> torch.Tensor | None:
        """The epoch's logits, or None when missing or failing a check (then logged)."""
        path = self.path(epoch)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                logits = fh.get_tensor("logits")
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            return self._refuse(path, f"unreadable ({exc})")
        if meta.get("key") != json.dumps(asdict(self.key), sort_keys=True):
            return self._refuse(path, "written for another teacher, data or schedule")
        want = self.key.steps * self.key.batch_size
        if logits.dim() != 3 or len(logits) != want:
            return self._refuse(path, f"shape {tuple(logits.shape)}, expected {want} rows")
        if meta.get("sha256") != _tensor_digest(logits):
            return self._refuse(path, "contents do not match their checksum")
        log.info("teacher outputs of epoch %d read from %s", epoch + 1, path)
        return logits

    def _refuse(self, path: Path, why: str) -> None:
        log.warning("teacher cache %s is %s; recomputing that epoch", path, why)
        return None

    def write(self, epoch: int, logits: torch.Tensor) -> None:
        """Store one epoch; a folder that refuses the write only costs the reuse (logged once)."""
        if self._unwritable:
            return
        meta = {
            "key": json.dumps(asdict(self.key), sort_keys=True),
            "sha256": _tensor_digest(logits),
        }
        blob = safetensors_bytes({"logits": logits.contiguous()}, metadata=meta)
        try:
            write_bytes(self.path(epoch), blob)
        except ErdeError as exc:
            self._unwritable = True
            log.warning("teacher cache not stored, training goes on without it: %s", exc)
            return
        log.info(
            "teacher cache: epoch %d stored, %.1f MB (%.1f MB in %s)",
            epoch + 1,
            len(blob) / 1e6,
            sum(p.stat().st_size for p in self.folder.glob("*.safetensors")) / 1e6,
            self.folder,
        )


def _tensor_digest(t: torch.Tensor) -> str:
    # Viewed as bytes so bfloat16 (which numpy lacks) hashes like any dtype.
    raw = t.detach().cpu().contiguous().view(torch.uint8).reshape(-1)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


class TeacherOutputs:
    """What the engine calls for teacher logits: the cache's rows when the epoch is stored,
    else the teacher's forward pass (kept, and stored when the epoch completes)."""

    def __init__(self, teacher, cache: TeacherCache | None, world: World) -> None:
        self.teacher, self.cache, self.world = teacher, cache, world
        self._stored: torch.Tensor | None = None
        self._fresh: list[list[torch.Tensor]] = []

    @property
    def exit_macs(self) -> list[int]:
        return self.teacher.exit_macs

    @property
    def stored(self) -> bool:
        """This epoch comes from the cache."""
        return self._stored is not None

    def begin_epoch(self, epoch: int) -> None:
        self.epoch, self._fresh = epoch, []
        self._stored = None if self.cache is None else self.cache.read(epoch)
        if self.world.distributed:  # every rank reads from the stored file or none does
            found = torch.tensor(int(self._stored is not None))
            if int(distributed.all_min(self.world, found)) == 0:
                self._stored = None

    def __call__(self, x: torch.Tensor, step: int) -> list[torch.Tensor]:
        if self._stored is not None:
            b, w = self.cache.key.batch_size, self.world
            rows = self._stored[step * b : (step + 1) * b][w.rank :: w.size].to(x.device)
            return list(rows.unbind(1))
        out = self.teacher(x)
        if self.cache is not None:
            self._fresh.append([o.detach().cpu() for o in out])
        return out

    def end_epoch(self) -> None:
        """Store a fully computed epoch (every rank must call this: it gathers under DDP)."""
        if self.cache is None or self._stored is not None:
            return
        if len(self._fresh) != self.cache.key.steps:
            return  # a partial epoch (stopped early): nothing to store
        mine = torch.stack([torch.stack(step, dim=1) for step in self._fresh])  # S x b x E x K
        every = distributed.gather_rows(self.world, mine)  # W x S x b x E x K
        if self.world.main:
            # Rank r held rows r::W of each global batch: interleave back to the global order.
            global_order = every.permute(1, 2, 0, 3, 4).flatten(1, 2).flatten(0, 1)
            self.cache.write(self.epoch, global_order)
        self._fresh = []
