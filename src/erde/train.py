"""The one training engine: teacher and every student method share `fit`; the method picks
the loss."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from erde import checkpoint as ckpt
from erde import distributed
from erde.config import Config, load_config, to_dict, to_yaml
from erde.data import DeviceBatches, ImageData, load_source, stratified_split
from erde.distributed import World
from erde.errors import ErdeError
from erde.losses import DistillLoss, make_loss, pair_exits
from erde.macs import backbone_macs, exit_macs
from erde.models import create_model

log = logging.getLogger("erde.train")
SINGLE = World()
CHECKPOINTS = "checkpoints"  # the run's subfolder for train.checkpoint_every


@dataclass
class Split:
    """The data of one run: the source and the seeded train/validation indices."""

    data: ImageData
    train_idx: torch.Tensor
    val_idx: torch.Tensor


def prepare_data(cfg: Config) -> Split:
    d = cfg.data
    data = load_source(d.source, d.root, download=d.download, verify=d.verify)
    val_size = int(d.val_size) if d.val_size >= 1 else float(d.val_size)
    train_idx, val_idx = stratified_split(data.train_y, val_size, cfg.train.seed)
    return Split(data, train_idx, val_idx)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ErdeError(
            f"train.device={name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ErdeError(f"train.device={name} but no CUDA GPU is visible; use train.device=cpu")
    return device


def square_size(data: ImageData) -> int:
    height, width = data.input_size
    if height != width:
        raise ErdeError(
            f"{data.name} images are {height}x{width}; the models take square images, "
            "so resize the data set to a square size first"
        )
    return height


def build_model(cfg: Config, data: ImageData) -> nn.Module:
    return create_model(
        cfg.model.name,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        exits=cfg.model.exits,
        input_size=square_size(data),
    )


def data_meta(data: ImageData) -> dict:
    return {
        "source": data.name,
        "classes": list(data.classes),
        "mean": list(data.mean),
        "std": list(data.std),
        "input_size": square_size(data),
        "in_channels": data.in_channels,
    }


def lr_factor(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """Base learning-rate multiplier at an optimiser step: linear warm-up, then the schedule."""
    t = cfg.train
    total = t.epochs * steps_per_epoch
    warmup = round(t.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if t.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if t.schedule == "multistep":
        return t.gamma ** sum(step >= m * total for m in t.milestones)
    return 1.0


def check_teacher(run_dir: str | Path, data: ImageData) -> tuple[nn.Module, dict]:
    """A finished run trained on the student's data: its model (CPU, eval mode) and sidecar.
    `erde reproduce` calls it before training any student, `Teacher` when distillation starts."""
    model, meta = ckpt.load_model(Path(run_dir))
    if not meta.get("finished"):
        raise ErdeError(
            f"teacher run {run_dir} has not finished training; finish it "
            f"(`erde train --resume --out {run_dir}`) before distilling from it"
        )
    theirs, ours = meta["data"], data_meta(data)
    for key in ("source", "classes", "input_size", "in_channels"):
        if theirs[key] != ours[key]:
            raise ErdeError(
                f"teacher {run_dir} was trained on data with {key}={theirs[key]!r} "
                f"but the student's data has {key}={ours[key]!r}; train both on "
                "the same data source"
            )
    return model, meta


class Teacher:
    """A finished run, frozen: eval mode, no gradients, checked against the student's data."""

    def __init__(self, run_dir: str, data: ImageData, device: torch.device, cfg: Config):
        model, meta = check_teacher(run_dir, data)
        model = model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.exit_macs: list[int] = meta["exit_macs"]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model(x)


def prepare_run_dir(run_dir: Path, cfg: Config, *, resume: bool, overwrite: bool) -> Config:
    """Refuse to clobber a run; return the config the run will use (the saved one on resume).

    Only reads: every rank of a multi-process run checks, rank 0 alone then writes
    (`start_run_dir`) once all of them agreed that the run can start.
    """
    has_run = (run_dir / ckpt.CONFIG).is_file()
    if resume:
        if not has_run:
            raise ErdeError(f"--resume: {run_dir} holds no erde run to resume; drop --resume")
        saved = load_config(str(run_dir / ckpt.CONFIG))
        if cfg is not None and to_dict(cfg) != to_dict(saved):
            ours, theirs = flat(to_dict(cfg)), flat(to_dict(saved))
            keys = sorted(k for k in ours if ours[k] != theirs.get(k))
            raise ErdeError(
                f"--resume: the config differs from the one {run_dir} was started with "
                f"(keys: {', '.join(keys)}); resume without a config, or start a new run"
            )
        return saved
    if cfg is None:
        raise ErdeError("give a config (preset name or YAML file) to start a run")
    if has_run and not overwrite:
        side = run_dir / ckpt.SIDECAR
        state = (
            "a finished run"
            if side.is_file() and ckpt.read_json(side, "sidecar").get("finished")
            else "an unfinished run (continue it with --resume)"
        )
        raise ErdeError(
            f"{run_dir} already holds {state}; pass --overwrite to replace it or "
            "choose another --out"
        )
    leftovers = set(ckpt.temporaries(run_dir))  # of a run killed while writing its config
    if run_dir.exists() and set(run_dir.iterdir()) - leftovers and not has_run:
        raise ErdeError(
            f"{run_dir} is not empty and is not an erde run folder; choose a new or "
            "empty folder for --out"
        )
    return cfg


def start_run_dir(run_dir: Path, cfg: Config) -> None:
    """A fresh run folder holding the resolved config (a checked, replaceable run is removed)."""
    if (run_dir / ckpt.CONFIG).is_file():
        shutil.rmtree(run_dir)
    remove_temporaries(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_text(run_dir / ckpt.CONFIG, to_yaml(cfg))


def remove_temporaries(run_dir: Path) -> None:
    """The half-written files of checkpoint writes a kill interrupted: each is as large as its
    checkpoint, and none will ever be completed."""
    for folder in (run_dir, run_dir / CHECKPOINTS):
        for tmp in ckpt.temporaries(folder):
            tmp.unlink(missing_ok=True)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


@torch.no_grad()
def exit_accuracy(
    model: nn.Module, batches: DeviceBatches, autocast, world: World = SINGLE
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


def build_loss(cfg: Config, macs: list[int], teacher: Teacher | None) -> tuple[DistillLoss, list]:
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
        pairing=pairing,
        num_exits=len(macs),
    )
    return loss_fn, pairing


def build_optimizer(cfg: Config, net: nn.Module, steps_per_epoch: int):
    """SGD without weight decay on biases and norm parameters, and the per-step schedule."""
    t = cfg.train
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=t.lr,
        momentum=t.momentum,
        nesterov=t.nesterov and t.momentum > 0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch)
    )
    return optimizer, scheduler


def train_batches_for(
    cfg: Config, split: Split, device: torch.device, world: World = SINGLE
) -> DeviceBatches:
    """This rank's training batches: its share of one seeded permutation, `batch_size / world`
    images a step, so a step of all ranks together sees the global `train.batch_size`."""
    t, data = cfg.train, split.data
    x_train, y_train = data.train_x[split.train_idx], data.train_y[split.train_idx]
    return DeviceBatches(
        x_train,
        y_train,
        batch_size=t.batch_size // world.size,
        mean=data.mean,
        std=data.std,
        device=device,
        shuffle=True,
        augment=cfg.data.augment,
        crop_padding=cfg.data.crop_padding,
        hflip=data.hflip,
        seed=t.seed,
        drop_last=len(y_train) > t.batch_size,
        channels_last=t.channels_last,
        rank=world.rank,
        world_size=world.size,
    )


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


def fit(
    cfg: Config | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Train one run (teacher or student) into `run_dir`; returns the last epoch's metrics.

    `stop_after` ends this call after that many epochs, leaving a resumable run: for time-limited
    or preemptible jobs that train in pieces. Started by `torchrun`, every process calls this;
    they train one data-parallel model (see `erde.distributed`) and rank 0 writes the run.
    """
    run_dir = Path(run_dir)
    cfg = prepare_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
    device = distributed.rank_device(resolve_device(cfg.train.device))
    check_world(cfg, device, distributed.launched_world_size())
    with distributed.process_group(device) as world:
        return _fit(cfg, run_dir, device, world, resume=resume, progress=progress, stop=stop_after)


def _fit(
    cfg: Config,
    run_dir: Path,
    device: torch.device,
    world: World,
    *,
    resume: bool,
    progress: bool,
    stop: int | None,
) -> dict:
    t, d = cfg.train, cfg.distill
    # Everything that can fail on one rank alone happens here, before any collective.
    with distributed.agreed(world):
        split = prepare_data(cfg)
        data = split.data
        torch.manual_seed(t.seed)  # the same on every rank: replicas start equal
        net = build_model(cfg, data).to(device)
        macs = exit_macs(net)
        meta = {
            "arch": net.arch,
            "exit_macs": macs,
            "backbone_macs": backbone_macs(net),
            "data": data_meta(data),
            "method": d.method,
            "epochs": t.epochs,
            "seed": t.seed,
            "teacher": d.teacher,
            "config": to_dict(cfg),
        }
        if t.sync_bn and world.distributed:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        if t.channels_last:
            net = net.to(memory_format=torch.channels_last)
        teacher = Teacher(d.teacher, data, device, cfg) if d.teacher else None
        loss_fn, meta["pairing"] = build_loss(cfg, macs, teacher)
        train_batches = train_batches_for(cfg, split, device, world)
        val_batches = DeviceBatches(
            data.train_x[split.val_idx[world.rank :: world.size]],
            data.train_y[split.val_idx[world.rank :: world.size]],
            batch_size=t.eval_batch_size,
            mean=data.mean,
            std=data.std,
            device=device,
            channels_last=t.channels_last,
        )
        steps_per_epoch = len(train_batches)
        optimizer, scheduler = build_optimizer(cfg, net, steps_per_epoch)
        scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
        state = ckpt.load_state(run_dir) if resume else None
        summary_writer = tensorboard_class() if t.tensorboard and world.main else None

    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    with distributed.agreed(world):  # a write refused on rank 0 stops every rank
        if world.main and not resume:
            start_run_dir(run_dir, cfg)
        elif world.main:
            remove_temporaries(run_dir)
    handler = writer = None
    if world.main:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        writer = summary_writer(str(run_dir / "tensorboard")) if summary_writer else None
    try:
        start_epoch, history = 0, []
        if state is not None:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            start_epoch = int(state["epoch"])
            restore_rng(state, device, world, t.seed, start_epoch)
            history = ckpt.read_jsonl(run_dir / ckpt.METRICS)[:start_epoch]
        elif world.distributed:
            torch.manual_seed(dropout_seed(t.seed, world.rank, 0))
        model: nn.Module = net
        if world.distributed:
            cuda = device.type == "cuda"
            model = DistributedDataParallel(net, device_ids=[device.index] if cuda else None)
        train_model = torch.compile(model) if t.compile else model
        # Validation runs each rank's shard through the plain network: no collective per batch.
        eval_model = train_model
        if world.distributed:
            eval_model = torch.compile(net) if t.compile else net

        log.info(
            "start %s %s epochs %d..%d on %s%s",
            d.method,
            cfg.model.name,
            start_epoch + 1,
            t.epochs,
            device,
            f" x {world.size} processes" if world.distributed else "",
        )
        row: dict = history[-1] if history else {}
        last = t.epochs if stop is None else min(t.epochs, start_epoch + stop)
        for epoch in range(start_epoch, last):
            row = train_epoch(
                train_model,
                teacher,
                loss_fn,
                train_batches,
                optimizer,
                scheduler,
                scaler,
                autocast,
                epoch,
                cfg,
                progress and world.main,
                world,
            )
            distributed.broadcast_buffers(world, net)
            row.update(
                {
                    f"val/acc/{i}": a
                    for i, a in enumerate(exit_accuracy(eval_model, val_batches, autocast, world))
                }
            )
            history.append(row)
            finished = epoch + 1 == t.epochs
            state = training_state(net, optimizer, scheduler, scaler, device, epoch + 1, world)
            with distributed.agreed(world):
                if world.main:
                    save_epoch(
                        run_dir,
                        net,
                        state,
                        history,
                        {**meta, "epoch": epoch + 1, "finished": finished},
                    )
                    every = t.checkpoint_every
                    if every and (epoch + 1) % every == 0 and not finished:
                        ckpt.save_weights(
                            run_dir / CHECKPOINTS,
                            net,
                            {**meta, "epoch": epoch + 1},
                            name=f"epoch{epoch + 1:04d}.safetensors",
                        )
            if not world.main:
                continue
            if writer is not None:
                for key, value in row.items():
                    writer.add_scalar(key, value, epoch + 1)
            log.info(
                "epoch %d %s",
                epoch + 1,
                " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"),
            )
        return row
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        if writer is not None:
            writer.close()


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


def tensorboard_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ErdeError(
            "train.tensorboard=true needs the tensorboard package: pip install 'erde[tensorboard]'"
        ) from None
    return SummaryWriter


def train_epoch(
    model,
    teacher,
    loss_fn,
    batches,
    optimizer,
    scheduler,
    scaler,
    autocast,
    epoch: int,
    cfg: Config,
    progress: bool,
    world: World = SINGLE,
) -> dict:
    """One pass over the training batches.

    The host waits for the device only every 20 steps, where the progress bar reads the loss and
    the ranks agree on whether any of them met a non-finite loss (so they all stop together).
    """
    model.train()
    batches.set_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    never = len(batches)
    first_bad = torch.full((), never, device=batches.device)  # first non-finite step
    bad = never
    seen, started = 0, time.perf_counter()
    bar = tqdm(
        batches,
        total=len(batches),
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        disable=None if progress else True,  # None: only on a terminal, not in CI logs
        leave=False,
        dynamic_ncols=True,
    )
    for step, (x, y) in enumerate(bar):
        with autocast():
            teacher_logits = teacher(x) if teacher is not None else None
            result = loss_fn(model(x), y, teacher_logits)
        loss = result.total
        first_bad = torch.minimum(
            first_bad, torch.where(torch.isfinite(loss.detach()), never, step)
        )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = len(y)
        seen += n
        for key, value in (("loss", loss.detach()), *result.components.items()):
            sums[key] = sums.get(key, 0.0) + value.float() * n
        if step % 20 == 0 or step + 1 == len(batches):
            bad = int(distributed.all_min(world, first_bad))
            if bad < never:
                break
            if progress:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    if bad < never:
        raise ErdeError(
            f"the training loss became NaN or infinite at epoch {epoch + 1}, step "
            f"{bad + 1}; the last good checkpoint is kept. Lower train.lr, "
            "use train.precision=fp32, or check the data"
        )
    elapsed = distributed.all_max(world, time.perf_counter() - started)
    keys = list(sums)
    totals = torch.stack([sums[k].double() for k in keys])
    totals = torch.cat([totals, totals.new_tensor([seen])])
    *values, seen_all = distributed.all_sum(world, totals).tolist()
    row = {
        "epoch": epoch + 1,
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": seen_all / elapsed,
        "epoch_s": elapsed,
    }
    row.update({f"train/{k}": v / seen_all for k, v in zip(keys, values, strict=True)})
    return row


def training_state(
    net: nn.Module,
    optimizer,
    scheduler,
    scaler,
    device: torch.device,
    epoch: int,
    world: World = SINGLE,
) -> dict:
    """Everything `--resume` needs; in a multi-process run also every rank's random stream
    (gathered from all ranks, so every rank must call this)."""
    state = {
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "rng_cpu": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    if world.distributed:
        state["rng_cpu_ranks"] = distributed.gather_rows(world, state["rng_cpu"])
        if device.type == "cuda":
            state["rng_cuda_ranks"] = distributed.gather_rows(world, state["rng_cuda"])
    return state


def save_epoch(run_dir: Path, net: nn.Module, state: dict, history: list[dict], meta: dict) -> None:
    """Weights first, then the state that says the epoch is done: a crash between them resumes
    the epoch again and overwrites the weights, never the reverse."""
    ckpt.save_weights(run_dir, net, meta)
    ckpt.write_text(
        run_dir / ckpt.METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)
    )
    ckpt.save_state(run_dir, state)
