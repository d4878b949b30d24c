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

import torch
from torch import nn
from tqdm.auto import tqdm

from erde import checkpoint as ckpt
from erde.config import Config, load_config, to_dict, to_yaml
from erde.data import DeviceBatches, ImageData, load_source, stratified_split
from erde.errors import ErdeError
from erde.losses import make_loss, pair_exits
from erde.macs import backbone_macs, exit_macs
from erde.models import create_model

log = logging.getLogger("erde.train")


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


class Teacher:
    """A finished run, frozen: eval mode, no gradients, checked against the student's data."""

    def __init__(self, run_dir: str, data: ImageData, device: torch.device, cfg: Config):
        model, meta = ckpt.load_model(Path(run_dir), device)
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
    """Refuse to clobber a run; return the config the run will use (the saved one on resume)."""
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
    if run_dir.exists() and any(run_dir.iterdir()) and not has_run:
        raise ErdeError(
            f"{run_dir} is not empty and is not an erde run folder; choose a new or "
            "empty folder for --out"
        )
    if has_run and overwrite:
        shutil.rmtree(run_dir)
    return cfg


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


@torch.no_grad()
def exit_accuracy(model: nn.Module, batches: DeviceBatches, autocast) -> list[float]:
    """Per-exit accuracy (fraction) over the batches, in eval mode; restores the caller's mode."""
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
    return [c / seen for c in correct.tolist()]


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
    or preemptible jobs that train in pieces.
    """
    run_dir = Path(run_dir)
    cfg = prepare_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
    t, d = cfg.train, cfg.distill
    device = resolve_device(t.device)
    split = prepare_data(cfg)
    data = split.data

    torch.manual_seed(t.seed)
    net = build_model(cfg, data).to(device)
    macs = exit_macs(net)
    if t.channels_last:
        net = net.to(memory_format=torch.channels_last)
    teacher = Teacher(d.teacher, data, device, cfg) if d.teacher else None
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

    x_train, y_train = data.train_x[split.train_idx], data.train_y[split.train_idx]
    train_batches = DeviceBatches(
        x_train,
        y_train,
        batch_size=t.batch_size,
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
    )
    val_batches = DeviceBatches(
        data.train_x[split.val_idx],
        data.train_y[split.val_idx],
        batch_size=t.eval_batch_size,
        mean=data.mean,
        std=data.std,
        device=device,
        channels_last=t.channels_last,
    )
    steps_per_epoch = len(train_batches)
    if steps_per_epoch == 0:
        raise ErdeError(
            f"the training split has {len(y_train)} images, fewer than one batch; "
            "lower train.batch_size or data.val_size"
        )

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
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    model = torch.compile(net) if t.compile else net

    start_epoch, history = 0, []
    if resume:
        state = ckpt.load_state(run_dir)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start_epoch, history = int(state["epoch"]), ckpt.read_jsonl(run_dir / ckpt.METRICS)
        history = history[:start_epoch]
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_text(run_dir / ckpt.CONFIG, to_yaml(cfg))

    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    writer = tensorboard_writer(run_dir) if t.tensorboard else None
    meta = {
        "arch": net.arch,
        "exit_macs": macs,
        "backbone_macs": backbone_macs(net),
        "data": data_meta(data),
        "method": d.method,
        "epochs": t.epochs,
        "seed": t.seed,
        "teacher": d.teacher,
        "pairing": pairing,
        "config": to_dict(cfg),
    }
    try:
        log.info(
            "start %s %s epochs %d..%d on %s",
            d.method,
            cfg.model.name,
            start_epoch + 1,
            t.epochs,
            device,
        )
        row: dict = history[-1] if history else {}
        last = t.epochs if stop_after is None else min(t.epochs, start_epoch + stop_after)
        for epoch in range(start_epoch, last):
            row = train_epoch(
                model,
                net,
                teacher,
                loss_fn,
                train_batches,
                optimizer,
                scheduler,
                scaler,
                autocast,
                epoch,
                cfg,
                progress,
            )
            row.update(
                {
                    f"val/acc/{i}": a
                    for i, a in enumerate(exit_accuracy(model, val_batches, autocast))
                }
            )
            history.append(row)
            finished = epoch + 1 == t.epochs
            save_epoch(
                run_dir,
                net,
                optimizer,
                scheduler,
                scaler,
                device,
                epoch + 1,
                history,
                {**meta, "epoch": epoch + 1, "finished": finished},
            )
            if t.checkpoint_every and (epoch + 1) % t.checkpoint_every == 0 and not finished:
                ckpt.save_weights(
                    run_dir / "checkpoints",
                    net,
                    {**meta, "epoch": epoch + 1},
                    name=f"epoch{epoch + 1:04d}.safetensors",
                )
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
        log.removeHandler(handler)
        handler.close()
        if writer is not None:
            writer.close()


def tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ErdeError(
            "train.tensorboard=true needs the tensorboard package: pip install 'erde[tensorboard]'"
        ) from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def train_epoch(
    model,
    net,
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
) -> dict:
    """One pass over the training batches; host syncs only where the progress bar reads the loss."""
    model.train()
    batches.set_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    first_bad = torch.tensor(-1)
    seen, started = 0, time.perf_counter()
    bar = tqdm(
        batches,
        total=len(batches),
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    for step, (x, y) in enumerate(bar):
        with autocast():
            teacher_logits = teacher(x) if teacher is not None else None
            result = loss_fn(model(x), y, teacher_logits)
        loss = result.total
        bad = ~torch.isfinite(loss.detach())
        first_bad = torch.where(bad & (first_bad < 0), torch.tensor(step), first_bad)
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
            if int(first_bad) >= 0:
                break
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    if int(first_bad) >= 0:
        raise ErdeError(
            f"the training loss became NaN or infinite at epoch {epoch + 1}, step "
            f"{int(first_bad) + 1}; the last good checkpoint is kept. Lower train.lr, "
            "use train.precision=fp32, or check the data"
        )
    elapsed = time.perf_counter() - started
    row = {
        "epoch": epoch + 1,
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": seen / elapsed,
        "epoch_s": elapsed,
    }
    row.update({f"train/{k}": float(v) / seen for k, v in sums.items()})
    return row


def save_epoch(
    run_dir: Path,
    net: nn.Module,
    optimizer,
    scheduler,
    scaler,
    device: torch.device,
    epoch: int,
    history: list[dict],
    meta: dict,
) -> None:
    """Weights first, then the state that says the epoch is done: a crash between them resumes
    the epoch again and overwrites the weights, never the reverse."""
    ckpt.save_weights(run_dir, net, meta)
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
    ckpt.write_text(
        run_dir / ckpt.METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)
    )
    ckpt.save_state(run_dir, state)
