"""Copies from a GPU to CPU memory through page-locked staging memory (layer 6, the lowest).

A copy from a GPU into ordinary (pageable) host memory runs at a fraction of the bus's speed (H100,
436 MiB: 1.3 GB/s; `bench/bench_transfer.py`); the layer-by-layer runner moves a decoder layer, its
backup and its activations to the CPU at every layer. Here a large tensor goes into page-locked memory
from PyTorch's caching host allocator (7.8 GB/s including a copy into ordinary memory afterwards; 54 GB/s
when the page-locked copy is kept, as for activations). Copies to the GPU use the driver's path (staging
them measured slower). Small tensors, other devices and ``QUARK_PINNED_TRANSFERS=0`` use ``Tensor.to``.
"""

from __future__ import annotations

import os

import torch

__all__ = ["PINNED_MIN_BYTES", "release_pinned_cache", "transfer"]

#: Tensors smaller than this move with plain ``Tensor.to`` (staging costs more than it saves).
PINNED_MIN_BYTES = 1 << 20

USE_PINNED = os.environ.get("QUARK_PINNED_TRANSFERS", "1") != "0"  # read at call time

#: Page-locked memory (PyTorch's caching host allocator, bytes in use) above which ``keep_pinned``
#: copies come back in ordinary memory: page-locked memory cannot be swapped, so a large calibration
#: set's activations must not all be held in it.
KEEP_PINNED_MAX_BYTES = 8 * 2**30


def _pinned_in_use() -> int:
    try:
        return int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))
    except (AttributeError, RuntimeError):  # an older PyTorch
        return 0


def transfer(t: torch.Tensor, device: torch.device | str, *, keep_pinned: bool = False) -> torch.Tensor:
    """``t.to(device)``; a copy from a CUDA device to the CPU goes through page-locked memory.

    That copy returns ordinary memory, unless ``keep_pinned`` (for short-lived tensors such as
    activations between layers: the staging memory is the result, no second copy).
    """
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        # the driver's own path: staging pageable memory first measured slower (H100, 436 MiB: 5.1 GB/s
        # against 7.0); a pinned tensor (activations kept pinned) goes without waiting
        return t.to(device, non_blocking=t.is_pinned())
    if (t.device.type != "cuda" or device.type != "cpu" or not USE_PINNED
            or t.numel() * t.element_size() < PINNED_MIN_BYTES or not t.is_contiguous()):
        return t.to(device)
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    if keep_pinned and _pinned_in_use() <= KEEP_PINNED_MAX_BYTES:
        return staged
    return staged.clone()


def release_pinned_cache() -> None:
    """Return the page-locked blocks that PyTorch's caching host allocator keeps for reuse, but no tensor holds,
    to the system. The allocator never does this by itself, so staging memory (the captured activations before
    they move to the GPU, the copies of a layer back to CPU memory) would stay resident for the rest of the
    process. Nothing happens before CUDA is initialised or where PyTorch has no such call."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    for name in ("_host_emptyCache", "_accelerator_emptyHostCache"):  # PyTorch 2.5+, then its newer name
        empty = getattr(torch._C, name, None)
        if empty is not None:
            empty()
            return
