"""Data-parallel runs under `torchrun`: the process group, this process's place in it, and the
few collectives the training engine needs.

`torchrun` starts one process per device and describes the job in environment variables
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, ...). Without them, or with a world of one,
everything here is a no-op and training is a plain single-process run.

Every collective must be entered by every rank, so an error that one rank meets alone (a file
only it cannot read) would leave the others waiting for ever. `agreed` closes that gap: code that
may raise `ErdeError` runs inside it, and if any rank raised, every rank raises.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from erde.errors import ErdeError


@dataclass(frozen=True)
class World:
    """This process's place in the job; `device` is the one its collectives run on."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0 alone writes files, logs and draws the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world_size() -> int:
    """Number of processes `torchrun` started (1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: torch.device) -> torch.device:
    """The device of this process: under torchrun on CUDA, each rank takes cuda:LOCAL_RANK."""
    if launched_world_size() == 1:
        return device
    if device.type not in ("cpu", "cuda"):
        raise ErdeError(
            f"train.device={device} cannot run under torchrun: multi-process training uses "
            "train.device=cpu (Gloo) or cuda (NCCL)"
        )
    if device.type == "cpu":
        return device
    if device.index is not None:
        raise ErdeError(
            f"train.device={device} names one GPU, but torchrun started "
            f"{launched_world_size()} processes; use train.device=cuda (or auto): each process "
            "takes the GPU numbered by its LOCAL_RANK"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ErdeError(
            f"torchrun started a process with LOCAL_RANK={local_rank} but this node has {count} "
            f"visible GPU(s); use --nproc_per_node={count} or fewer"
        )
    return torch.device("cuda", local_rank)


@contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join the job `torchrun` describes (NCCL on CUDA, Gloo on CPU) and leave it on exit.

    A group that already exists (the caller made it) is used and left open. On a clean exit or an
    `ErdeError` (which every rank raises together, see `agreed`) all ranks meet at a barrier
    before the group is destroyed, so no rank tears down a group that others still use. Any other
    exception is a bug on this rank alone: the group is destroyed without waiting, and torchrun
    stops the other processes.
    """
    if launched_world_size() == 1:
        yield World(device=device)
        return
    owned = not dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if owned:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    world = World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        device=device,
    )
    clean = False
    try:
        yield world
        clean = True
    except ErdeError:
        clean = True
        raise
    finally:
        if owned:
            if clean:
                barrier(world)
            dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        if world.device.type == "cuda":
            dist.barrier(device_ids=[world.device.index])
        else:
            dist.barrier()


@contextmanager
def agreed(world: World) -> Iterator[None]:
    """Run a block on every rank; if it raised `ErdeError` on any rank, raise it on all of them.

    The block must not use collectives itself (a rank that failed early would never join them).
    Ranks that did not fail raise an `ErdeError` that points at the message of the one that did.
    """
    error: ErdeError | None = None
    try:
        yield
    except ErdeError as exc:
        error = exc
    if not world.distributed:
        if error is not None:
            raise error
        return
    first = torch.tensor([world.size if error is None else world.rank], device=world.device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    if error is not None:
        raise error
    if int(first) < world.size:
        raise ErdeError(
            f"rank {int(first)} stopped with an error (its message is printed above); every "
            "rank stops with it. Fix what it names and start again"
        )


def all_sum(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over ranks (a new tensor on `tensor`'s device)."""
    if not world.distributed:
        return tensor
    out = tensor.to(world.device, copy=True)
    dist.all_reduce(out)
    return out.to(tensor.device)


def all_max(world: World, value: float) -> float:
    if not world.distributed:
        return value
    out = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return float(out)


def all_min(world: World, tensor: torch.Tensor) -> torch.Tensor:
    if not world.distributed:
        return tensor
    out = tensor.to(world.device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out.to(tensor.device)


def gather_rows(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same shape on all), stacked by rank, on the CPU."""
    if not world.distributed:
        return tensor.cpu().unsqueeze(0)
    local = tensor.to(world.device)
    rows = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(rows, local)
    return torch.stack(rows).cpu()


def broadcast_buffers(world: World, module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics): the model rank 0 saves.

    DDP does the same at the start of every training forward; doing it once before validation
    makes every rank evaluate exactly the weights and statistics that are written to disk.
    """
    if world.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
