"""The one training engine: teacher and every student method share `fit`; the method picks
the loss (docs/method.md).

`fit` = checks -> `setup` (data, model, teacher, loss, optimiser) -> `resume` -> the epoch loop.
Files are `RunWriter`'s job, data preparation `erde.data.prepare`'s, the schedule
`erde.train.optim`'s.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from erde import distributed
from erde.config.schema import Config, to_dict
from erde.data.prepare import (
    Batches,
    Split,
    check_split,
    data_info,
    eval_batches,
    prepare_data,
    train_batches,
)
from erde.device import resolve_device, resolve_precision
from erde.distill.losses import DistillLoss, make_loss, pair_exits
from erde.distill.teacher import Teacher
from erde.distill.teacher_cache import CacheKey, TeacherCache, TeacherOutputs, indices_digest
from erde.distributed import World
from erde.errors import ErdeError
from erde.logs import Heartbeat
from erde.models.build import build_model
from erde.models.early_exit import EarlyExitNet
from erde.models.macs import exit_macs, static_macs
from erde.run import checkpoint as ckpt
from erde.run.layout import RunDir
from erde.run.lock import writer_lock
from erde.run.metrics import read_jsonl
from erde.run.model_info import ModelInfo
from erde.train.optim import build_optimizer
from erde.train.threads import choose_threads
from erde.train.writer import RunWriter, check_run_dir, log

SINGLE = World()


@dataclass
class EpochParts:
    """What one training epoch needs; `model` is the one to step (maybe wrapped by DDP or
    `torch.compile`)."""

    model: nn.Module
    teacher: TeacherOutputs | None
    loss_fn: DistillLoss
    batches: Batches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager]
    epochs: int
    world: World = SINGLE
    progress: bool = False


@dataclass
class Setup:
    """A run ready to train: the plain network, its sidecar, the epoch parts and validation."""

    net: nn.Module
    info: ModelInfo
    parts: EpochParts
    val: Batches
    eval_model: nn.Module


def fit(
    cfg: Config | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """Train one run (teacher or student) into `run_dir`; returns the last epoch's metrics.

    `stop_after` ends this call after that many epochs, leaving a resumable run: for time-limited
    or preemptible jobs that train in pieces. `on_epoch` gets each epoch's metrics row once the
    epoch is saved (in every process); an exception it raises, such as a tuner's pruning, ends
    the run there, resumable. Started by `torchrun`, every process calls this; they train one
    data-parallel model (see `erde.distributed`) and rank 0 writes the run.
    """
    run = RunDir(run_dir)
    # One writer per run folder: rank 0 holds its lock (torchrun's other ranks write nothing).
    main = os.environ.get("RANK", "0") == "0"
    with writer_lock(run.path) if main else contextlib.nullcontext():
        cfg = check_run_dir(run, cfg, resume=resume, overwrite=overwrite)
        device = distributed.rank_device(resolve_device(cfg.train.device))
        check_world(cfg, device, distributed.launched_world_size())
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads, why = choose_threads(cfg.train.threads, local)
        torch.set_num_threads(threads)
        with distributed.process_group(device) as world:
            # Everything that can fail on one rank alone happens here, before any collective.
            with distributed.agreed(world):
                s = setup(cfg, device, world, progress=progress)
                state = ckpt.load_state(run.path) if resume else None
                writer = RunWriter(run, cfg) if world.main else None
            with distributed.agreed(world):  # a write refused on rank 0 stops every rank
                if writer is not None:
                    writer.start(resume=resume)
            with writer or contextlib.nullcontext():
                start = restore(s, state, device, cfg.train.seed)
                if writer is not None:
                    writer.metrics.keep(start)
                history = read_jsonl(run.metrics, limit=start)
                last = cfg.train.epochs if stop_after is None else start + stop_after
                if world.main:
                    log.info(
                        "start %s %s epochs %d..%d on %s%s, %d CPU thread(s) (%s)",
                        cfg.distill.method,
                        cfg.model.name,
                        start + 1,
                        cfg.train.epochs,
                        device,
                        f" x {world.size} processes" if world.distributed else "",
                        threads,
                        why,
                    )
                epochs = range(start, min(cfg.train.epochs, last))
                return run_epochs(s, writer, history, epochs, on_epoch)


def setup(cfg: Config, device: torch.device, world: World = SINGLE, *, progress: bool) -> Setup:
    """Data, model (the same initial weights on every rank), teacher, loss and optimiser."""
    t, d = cfg.train, cfg.distill
    precision = resolve_precision(t.precision, device)
    if t.precision == "auto" and world.main:
        log.info("train.precision=auto: %s on this %s", precision, device.type)
    split = prepare_data(cfg)
    data = data_info(split.data, cfg.data.eval_crop)
    check_split(cfg, split)
    torch.manual_seed(t.seed)  # the same on every rank: replicas start equal
    net = build_model(cfg.model, data, freeze_backbone=t.freeze_backbone).to(device)
    split = weights_normalization(cfg, net, split, world)
    data = data_info(split.data)
    batches = train_batches(cfg, split, device, world)
    teacher = teacher_outputs(cfg, split, batches, device, world) if d.teacher else None
    loss_fn, pairing = build_loss(cfg, exit_macs(net), teacher)
    info = ModelInfo(
        arch=net.arch,
        exit_macs=exit_macs(net),
        static_macs=static_macs(net),
        data=data,
        method=d.method,
        seed=t.seed,
        epochs=t.epochs,
        teacher=d.teacher,
        pairing=pairing,
        config=to_dict(cfg),
        precision=precision,
        weights=net.weights,
    )
    if t.sync_bn and world.distributed:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if t.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(t, net, len(batches))
    model: nn.Module = net
    if world.distributed:
        cuda = device.type == "cuda"
        model = DistributedDataParallel(net, device_ids=[device.index] if cuda else None)
    train_model = torch.compile(model) if t.compile else model
    # Validation runs each rank's shard through the plain network: no collective per batch.
    eval_model = (torch.compile(net) if t.compile else net) if world.distributed else train_model
    parts = EpochParts(
        model=train_model,
        teacher=teacher,
        loss_fn=loss_fn,
        batches=batches,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        autocast=autocaster(device, precision),
        epochs=t.epochs,
        world=world,
        progress=progress and world.main,
    )
    val = eval_batches(cfg, split, "val", device, world, channels_last=t.channels_last)
    return Setup(net, info, parts, val, eval_model)


def weights_normalization(cfg: Config, net: EarlyExitNet, split: Split, world: World) -> Split:
    """Fine-tuning keeps the normalisation the pretrained weights were trained with (timm's
    `pretrained_cfg`, torchvision's weights transforms) unless `data.mean`/`data.std` are set:
    the weights expect their inputs so."""
    given = net.weights_normalization
    if given is None or cfg.data.mean is not None or cfg.data.std is not None:
        return split
    mean, std = given
    if len(mean) != split.data.in_channels:
        if world.main:
            log.info(
                "the pretrained weights normalise %d channels, the data has %d: normalising "
                "with the training split's statistics",
                len(mean),
                split.data.in_channels,
            )
        return split
    if world.main:
        log.info("normalising with the pretrained weights' mean %s and std %s", mean, std)
    return replace(split, data=replace(split.data, mean=tuple(mean), std=tuple(std)))


def teacher_outputs(
    cfg: Config, split: Split, batches: Batches, device: torch.device, world: World = SINGLE
) -> TeacherOutputs:
    """The teacher behind its output cache (or bare, with `distill.teacher_cache=false` or
    streamed data, whose stored outputs would grow with the data set: images x exits x classes
    an epoch, about 10 GB for ImageNet in bf16)."""
    d, t = cfg.distill, cfg.train
    teacher = Teacher(d.teacher, data_info(split.data), device, t.channels_last)
    if d.teacher_cache and split.streamed and world.main:
        log.info(
            "teacher cache off for streamed data: the teacher runs on every batch (its stored "
            "outputs would grow with the data set, images x exits x classes an epoch)"
        )
    if not d.teacher_cache or split.streamed:
        return TeacherOutputs(teacher, None, world)
    key = CacheKey(
        teacher_sha256=teacher.weights_sha256,
        teacher_mean=floats(teacher.info.data.mean),
        teacher_std=floats(teacher.info.data.std),
        source=split.data.name,
        train_indices_sha256=indices_digest(split.train_idx, split.data.train_y),
        num_train=len(split.train_idx),
        batch_size=t.batch_size,
        mean=floats(split.data.mean),
        std=floats(split.data.std),
        steps=len(batches),
        augment=cfg.data.augment,
        crop_padding=cfg.data.crop_padding,
        hflip=split.data.hflip,
        seed=t.seed,
        precision=resolve_precision(t.precision, device),
        channels_last=t.channels_last,
        device_type=device.type,
    )
    folder = Path(d.teacher_cache_dir) if d.teacher_cache_dir else RunDir(d.teacher).teacher_cache
    return TeacherOutputs(teacher, TeacherCache(folder, key), world)


def floats(values: Sequence[float]) -> tuple[float, ...]:
    """Statistics as plain floats, for a key that must read the same in JSON everywhere."""
    return tuple(float(v) for v in values)


def fill_teacher_cache(cfg: Config, *, progress: bool = False) -> None:
    """Compute and store the teacher's outputs for every epoch of a student config, so that
    students started afterwards (in parallel, say) never run the teacher."""
    device = resolve_device(cfg.train.device)
    split = prepare_data(cfg)
    batches = train_batches(cfg, split, device)
    outputs = teacher_outputs(cfg, split, batches, device)
    if outputs.cache is None:
        return
    autocast = autocaster(device, resolve_precision(cfg.train.precision, device))
    for epoch in tqdm(
        range(cfg.train.epochs), desc="teacher cache", disable=None if progress else True
    ):
        outputs.begin_epoch(epoch)
        if outputs.stored:
            continue
        batches.set_epoch(epoch)
        for step, (x, _) in enumerate(batches):
            with autocast():
                outputs(x, step)
        outputs.end_epoch()


def autocaster(
    device: torch.device, precision: str
) -> Callable[[], contextlib.AbstractContextManager]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    return autocast


def build_loss(
    cfg: Config, macs: list[int], teacher: Teacher | None
) -> tuple[DistillLoss, list[int] | None]:
    """The method's loss and, with a teacher, the teacher exit each student exit learns from."""
    d = cfg.distill
    pairing = None
    if teacher is not None:
        pairing = pair_exits(
            [m / macs[-1] for m in macs],
            [m / teacher.exit_macs[-1] for m in teacher.exit_macs],
            d.pairing,
        )
    loss_fn = make_loss(
        d.method,
        alpha=d.alpha,
        beta=d.beta,
        temperature=d.temperature,
        exit_weights=d.exit_weights,
        entropy_term=d.entropy_term,
        entropy_exits=d.entropy_exits,
        options=d.options,
        pairing=pairing,
        num_exits=len(macs),
    )
    return loss_fn, pairing


def restore(s: Setup, state: dict | None, device: torch.device, seed: int) -> int:
    """Put the saved training state back; returns the epoch to start from."""
    p = s.parts
    if state is None:
        if p.world.distributed:
            torch.manual_seed(dropout_seed(seed, p.world.rank, 0))
        return 0
    saved = state.get("teacher_sha256")
    if p.teacher is not None and saved not in (None, p.teacher.teacher.weights_sha256):
        raise ErdeError(
            f"the teacher {s.info.teacher} has other weights than when this run started "
            "(replaced or retrained since); resume with the teacher it began with, or start "
            "the student again with --overwrite"
        )
    try:
        s.net.load_state_dict(state["model"])
        p.optimizer.load_state_dict(state["optimizer"])
        p.scheduler.load_state_dict(state["scheduler"])
        p.scaler.load_state_dict(state["scaler"])
        epoch = int(state["epoch"])
        if not 0 <= epoch <= p.epochs:
            raise ValueError(f"epoch {epoch} is outside 0..{p.epochs}")
        restore_rng(state, device, p.world, seed, epoch)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ErdeError(
            f"the training state state.pt does not fit this run ({type(exc).__name__}: "
            f"{reason}); it is damaged or from another run: start again with --overwrite"
        ) from None
    return epoch


def run_epochs(
    s: Setup,
    writer: RunWriter | None,
    history: list[dict],
    epochs: range,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """Train, validate and save each epoch, then hand its row to `on_epoch`; returns the last
    metrics row."""
    p = s.parts
    row: dict = history[-1] if history else {}
    for epoch in epochs:
        row = train_epoch(p, epoch)
        distributed.broadcast_buffers(p.world, s.net)
        accuracy = exit_accuracy(s.eval_model, s.val, p.autocast, p.world)
        row.update({f"val/acc/{i}": a for i, a in enumerate(accuracy, start=1)})  # exit 1..n
        history.append(row)
        info = replace(s.info, epoch=epoch + 1, finished=epoch + 1 == p.epochs)
        state = training_state(s.net, p, epoch + 1)
        with distributed.agreed(p.world):
            if writer is not None:
                writer.save_epoch(s.net, state, row, info)
        if on_epoch is not None:
            on_epoch(row)
    return row


def check_world(cfg: Config, device: torch.device, world_size: int) -> None:
    """Settings a multi-process run cannot honour; checked before any process joins the group."""
    t = cfg.train
    if t.batch_size % world_size:
        raise ErdeError(
            f"train.batch_size={t.batch_size} is the global batch, split evenly over the "
            f"{world_size} processes torchrun started; pick a multiple of {world_size}"
        )
    if t.sync_bn and world_size > 1 and device.type != "cuda":
        raise ErdeError(
            "train.sync_bn=true needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs only); "
            "drop it for CPU runs, where each process normalises its own share of the batch"
        )


def dropout_seed(seed: int, rank: int, epoch: int) -> int:
    """Each rank's own random stream (dropout masks) of a multi-process run; one stream shared
    by all ranks would give the same masks to the images at the same place in every shard."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, np.uint64)[0])


def restore_rng(state: dict, device: torch.device, world: World, seed: int, epoch: int) -> None:
    """Put back the random streams (dropout) where the interrupted run left them.

    A multi-process state holds one stream per rank; resumed with another number of processes,
    each rank starts a fresh stream: the run goes on correctly but is no longer bit-identical to
    an uninterrupted one.
    """
    cpu, cuda = state.get("rng_cpu_ranks"), state.get("rng_cuda_ranks")
    if not world.distributed:
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    elif cpu is not None and len(cpu) == world.size:
        # A copy: torch (2.14) crashes on a state that is a view into a larger storage.
        torch.set_rng_state(cpu[world.rank].clone())
        if device.type == "cuda" and cuda is not None:
            torch.cuda.set_rng_state(cuda[world.rank].clone(), device)
    else:
        torch.manual_seed(dropout_seed(seed, world.rank, epoch))
        if world.main:
            log.warning(
                "resuming with %d processes, not the number the state was saved with: "
                "dropout draws new random streams from here on",
                world.size,
            )


@torch.no_grad()
def exit_accuracy(
    model: nn.Module, batches: Batches, autocast, world: World = SINGLE
) -> list[float]:
    """Per-exit accuracy (fraction) over the batches of every rank, in eval mode; restores the
    caller's mode. Ranks count their own shard; the counts are summed, not the fractions."""
    was_training = model.training
    model.eval()
    correct: torch.Tensor | None = None
    seen = 0
    for x, y in batches:
        with autocast():
            logits = model(x)
        hits = torch.stack([(z.argmax(1) == y).sum() for z in logits])
        correct = hits if correct is None else correct + hits
        seen += len(y)
    model.train(was_training)
    if correct is None:
        return []
    counts = distributed.all_sum(world, torch.cat([correct, correct.new_tensor([seen])]))
    *correct_all, seen_all = counts.tolist()
    return [c / seen_all for c in correct_all]


def _epoch_bar(p: EpochParts, epoch: int) -> tqdm:
    """The epoch's progress bar over the training batches."""
    return tqdm(
        p.batches,
        total=len(p.batches),
        desc=f"epoch {epoch + 1}/{p.epochs}",
        disable=None if p.progress else True,  # None: only on a terminal, not in CI logs
        leave=False,
        dynamic_ncols=True,
    )


def _non_finite_loss(epoch: int, bad: int) -> ErdeError:
    """The error for a NaN or infinite training loss at step `bad` of `epoch`."""
    return ErdeError(
        f"the training loss became NaN or infinite at epoch {epoch + 1}, step "
        f"{bad + 1}; the last good checkpoint is kept. Lower train.lr or "
        "train.momentum, shorten the ramp (raise train.warmup_epochs), lower "
        "distill.beta or raise distill.temperature, use train.precision=fp32, or check the "
        "data"
    )


def train_epoch(p: EpochParts, epoch: int) -> dict:
    """One pass over the training batches; returns the epoch's metrics row.

    The host waits for the device only every 20 steps, where the progress bar reads the loss and
    the ranks agree on whether any of them met a non-finite loss (so they all stop together).
    """
    p.model.train()
    p.batches.set_epoch(epoch)
    if p.teacher is not None:
        p.teacher.begin_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    never = len(p.batches)
    first_bad = torch.full((), never, device=p.batches.device)  # first non-finite step
    bad = never
    seen, started, beat = 0, time.perf_counter(), Heartbeat()
    bar = _epoch_bar(p, epoch)
    for step, (x, y) in enumerate(bar):
        with p.autocast():
            teacher_logits = p.teacher(x, step) if p.teacher is not None else None
            result = p.loss_fn(p.model(x), y, teacher_logits)
        loss = result.total
        finite = torch.isfinite(loss.detach())
        first_bad = torch.minimum(first_bad, torch.where(finite, never, step))
        p.optimizer.zero_grad(set_to_none=True)
        p.scaler.scale(loss).backward()
        p.scaler.step(p.optimizer)
        p.scaler.update()
        p.scheduler.step()
        seen += len(y)
        for key, value in (("loss", loss.detach()), *result.components.items()):
            sums[key] = sums.get(key, 0.0) + value.float() * len(y)
        if step % 20 == 0 or step + 1 == len(p.batches):
            bad = int(distributed.all_min(p.world, first_bad))
            if bad < never:
                break
            if p.progress:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if bar.disable and beat.due():  # no terminal: a plain line every 30 s
                    log.info(
                        "epoch %d of %d: step %d of %d, loss %.4f",
                        *(epoch + 1, p.epochs, step + 1, len(p.batches), loss.item()),
                    )
    bar.close()
    if p.teacher is not None and bad == never:
        p.teacher.end_epoch()
    if bad < never:
        raise _non_finite_loss(epoch, bad)
    return epoch_row(p, epoch, sums, seen, time.perf_counter() - started)


def epoch_row(p: EpochParts, epoch: int, sums: dict, seen: int, elapsed: float) -> dict:
    """Loss components averaged over the images of every rank; the slowest rank's time."""
    elapsed = distributed.all_max(p.world, elapsed)
    keys = list(sums)
    totals = torch.stack([sums[k].double() for k in keys])
    totals = torch.cat([totals, totals.new_tensor([seen])])
    *values, seen_all = distributed.all_sum(p.world, totals).tolist()
    row = {
        "epoch": epoch + 1,
        "lr": p.optimizer.param_groups[0]["lr"],
        "images_per_s": seen_all / elapsed,
        "epoch_s": elapsed,
    }
    row.update({f"train/{k}": v / seen_all for k, v in zip(keys, values, strict=True)})
    return row


def training_state(net: nn.Module, p: EpochParts, epoch: int) -> dict:
    """Everything `--resume` needs; in a multi-process run also every rank's random stream
    (gathered from all ranks, so every rank must call this)."""
    state = {
        "model": net.state_dict(),
        "optimizer": p.optimizer.state_dict(),
        "scheduler": p.scheduler.state_dict(),
        "scaler": p.scaler.state_dict(),
        "epoch": epoch,
        "rng_cpu": torch.get_rng_state(),
    }
    if p.teacher is not None:
        state["teacher_sha256"] = p.teacher.teacher.weights_sha256
    device = p.batches.device
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    if p.world.distributed:
        state["rng_cpu_ranks"] = distributed.gather_rows(p.world, state["rng_cpu"])
        if device.type == "cuda":
            state["rng_cuda_ranks"] = distributed.gather_rows(p.world, state["rng_cuda"])
    return state
