"""Copies between CPU memory and a GPU through page-locked staging memory (layer 6, the lowest).

A copy from ordinary (pageable) host memory makes the driver stage it through its own small
page-locked buffer, and runs at a fraction of the bus's speed (the layer-by-layer runner moves a
decoder layer and its activations at every layer, both ways). Here a large tensor is first copied
into page-locked memory from PyTorch's caching host allocator (a CPU copy at memory speed, reused
across calls) and that is handed to the GPU's copy engine. Small tensors, other devices and
``QUARK_PINNED_TRANSFERS=0`` use plain ``Tensor.to``.
"""

from __future__ import annotations

import os

import torch

__all__ = ["PINNED_MIN_BYTES", "transfer"]

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
    """``t.to(device)``, staged through page-locked memory between the CPU and a CUDA device.

    A copy to the CPU returns ordinary memory, unless ``keep_pinned`` (for short-lived tensors such
    as activations between layers: the staging memory is the result, no second copy).
    """
    device = torch.device(device)
    if (not (USE_PINNED and torch.cuda.is_available()) or t.numel() * t.element_size() < PINNED_MIN_BYTES
            or not t.is_contiguous()):
        return t.to(device)
    if t.device.type == "cpu" and device.type == "cuda":
        if t.is_pinned():
            return t.to(device, non_blocking=True)
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staged.copy_(t)
        # the caching host allocator keeps the block until the copy engine has read it
        return staged.to(device, non_blocking=True)
    if t.device.type == "cuda" and device.type == "cpu":
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staged.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        if keep_pinned and _pinned_in_use() <= KEEP_PINNED_MAX_BYTES:
            return staged
        return staged.clone()
    return t.to(device)
