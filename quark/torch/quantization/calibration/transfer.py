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
from collections.abc import Iterator

import torch

__all__ = ["PINNED_MIN_BYTES", "STAGE_BYTES", "host_pieces", "release_pinned_cache", "transfer"]

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
    if keep_pinned and _pinned_in_use() <= KEEP_PINNED_MAX_BYTES:
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staged.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return staged
    out = torch.empty(t.shape, dtype=t.dtype)
    flat = _bytes_of(out)
    for start, piece in host_pieces(t):
        flat[start:start + piece.numel()].copy_(piece)
    return out


#: Bytes of a copy from a GPU that one page-locked staging buffer holds (:func:`host_pieces` uses two): what a
#: copy into ordinary memory or a file keeps page-locked, whatever the tensor's size (a Llama-3-70B MLP weight
#: staged whole held 0.47 GB, and PyTorch's caching host allocator keeps such blocks for the rest of the run).
STAGE_BYTES = 64 << 20


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def host_pieces(t: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(byte offset, uint8 piece)`` of CUDA tensor ``t``'s bytes in host memory, ``STAGE_BYTES`` at a time.

    Each piece is page-locked memory valid until the next is asked for: two buffers take turns, and the copy of
    the next piece runs while the caller uses the current one (copies it into ordinary memory, writes it to a
    file)."""
    flat = _bytes_of(t if t.is_contiguous() else t.contiguous())
    n = flat.numel()
    if n == 0:
        return
    size = min(STAGE_BYTES, n)
    buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(1 if n == size else 2)]
    stream = torch.cuda.current_stream(t.device)
    starts = list(range(0, n, size))

    def issue(k: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        piece = buffers[k % len(buffers)][:min(size, n - starts[k])]
        piece.copy_(flat[starts[k]:starts[k] + piece.numel()], non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
        return piece, done

    following = issue(0)
    for k, start in enumerate(starts):
        piece, done = following
        if k + 1 < len(starts):  # into the buffer of piece k - 1, which the caller is done with
            following = issue(k + 1)
        done.synchronize()
        yield start, piece


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
