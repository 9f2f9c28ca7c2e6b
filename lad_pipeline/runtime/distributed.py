"""torch.distributed helpers: one code path for a single process and for torchrun."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import LadError

T = TypeVar("T")


def init_from_env(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns rank, world size, device.

    ``device``: ``cpu``, ``cuda`` (under torchrun, the GPU of the process's ``LOCAL_RANK``), ``cuda:N``
    (one process only); empty or None: CUDA when PyTorch sees a GPU, else the CPU. Raises LadError, before
    anything is written, when the device cannot be had (no CUDA, fewer GPUs than torchrun processes).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    chosen = resolve_device(device, local_rank, local_world if world > 1 else 1)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return rank(), world, chosen


def resolve_device(spec: str | None, local_rank: int = 0, local_world: int = 1) -> torch.device:
    """The torch device of ``spec`` (see ``init_from_env``) for process ``local_rank`` of ``local_world`` on
    this host; every process of a host that cannot have one GPU each refuses, with the same line."""
    if not spec:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise LadError(f"device {spec!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise LadError(f"device {spec} was asked for but PyTorch sees no CUDA GPU",
                       hint="use --device cpu (or check CUDA_VISIBLE_DEVICES and the driver)")
    count = torch.cuda.device_count()
    if local_world > 1:  # torchrun: one GPU per process, by LOCAL_RANK
        if device.index is not None:
            raise LadError(f"device {spec} names one GPU but torchrun starts {local_world} processes on this host",
                           hint="use --device cuda (each process takes the GPU of its LOCAL_RANK)")
        if local_world > count:
            raise LadError(f"torchrun starts {local_world} processes on this host but it has {count} visible GPU(s)",
                           hint=f"use --nproc_per_node {count} (one process per GPU), or --device cpu")
        return torch.device("cuda", local_rank)
    index = 0 if device.index is None else device.index
    if index >= count:
        raise LadError(f"device {spec} does not exist: this host has {count} visible GPU(s) (cuda:0 to "
                       f"cuda:{count - 1})")
    return torch.device("cuda", index)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts them at the start of each forward, but the forward then updates each rank's copy on its own
    batch: after a training step the ranks disagree until the next one. Whatever is evaluated or saved between
    steps must be rank 0's model, the one the checkpoint holds.
    """
    if not dist.is_initialized():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` on every rank (small payloads: detections, counts)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()  # all_gather_object fills each slot with a rank's obj
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group (the end of a torchrun command), so that no rank exits holding it."""
    if dist.is_initialized():
        dist.destroy_process_group()
