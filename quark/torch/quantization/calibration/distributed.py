"""Collectives over ``torch.distributed`` ranks, and nothing when there is one process (layer 6).

Every statistic the calibration gathers (observer ranges, Hessians, activation statistics, search
losses) goes through these functions, so a one-process run and an N-process run under an
initialised process group (``torchrun``) share one code path. With no process group, or a group of
one rank, each function returns its input unchanged and costs nothing.

Tensors are reduced where the backend can take them: NCCL needs CUDA tensors, gloo CPU tensors; a
tensor elsewhere travels to the backend's device and back, keeping its dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["active", "all_reduce_", "broadcast_", "rank", "shard", "world_size"]

T = TypeVar("T")

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def _backend_device(tensor: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return tensor.device if tensor.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(tensor: torch.Tensor, run) -> torch.Tensor:
    device = _backend_device(tensor)
    if tensor.device == device and tensor.is_contiguous():
        run(tensor)
        return tensor
    moved = tensor.detach().to(device).contiguous()
    run(moved)
    tensor.copy_(moved)
    return tensor


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over every rank (``op``: ``sum``, ``min`` or ``max``); returns it."""
    if op not in _OPS:
        raise ValueError(f"all_reduce_(op={op!r}) is not one of: {', '.join(_OPS)}")
    if not active():
        return tensor
    return _collective(tensor, lambda t: dist.all_reduce(t, op=_OPS[op]))


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place on every rank with rank ``src``'s value; returns it."""
    if not active():
        return tensor
    return _collective(tensor, lambda t: dist.broadcast(t, src=src))


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: a contiguous slice, the first ranks taking one more when the
    count does not divide (all of ``items`` without a process group)."""
    n, ranks, me = len(items), world_size(), rank()
    base, extra = divmod(n, ranks)
    start = me * base + min(me, extra)
    return list(items[start:start + base + (1 if me < extra else 0)])
