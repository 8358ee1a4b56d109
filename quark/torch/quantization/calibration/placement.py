"""Where a model's tensors are, and moving parts of it to a compute device and back (layer 6).

A model may sit on the compute device, in CPU memory, or spread over devices; the layer-by-layer
paths move one decoder layer at a time to the compute device, and the modules outside the decoder
layers (embeddings, final norm, ``lm_head``) only for the passes that need them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["modules_outside", "normalize_device", "on_device", "onloaded", "tensors_moved"]


def normalize_device(device: torch.device | str) -> torch.device:
    """``device`` with an explicit index for accelerators (``cuda`` -> ``cuda:<current>``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def on_device(module: nn.Module, device: torch.device | str) -> bool:
    """Whether every parameter and buffer of ``module`` is on ``device`` (meta tensors count as elsewhere)."""
    device = normalize_device(device)
    return all(t.device == device for t in (*module.parameters(), *module.buffers()))


def modules_outside(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The modules of ``model`` that are neither the decoder layer list nor inside one of its layers."""
    inside = {id(m) for m in layers.modules()}
    return [m for m in model.modules() if id(m) not in inside]


@contextlib.contextmanager
def tensors_moved(modules: Sequence[nn.Module], device: torch.device | str) -> Iterator[None]:
    """Move the direct parameters and buffers of ``modules`` to ``device``; put each back where it was.

    Parameters are moved through ``.data`` so that tied weights (one Parameter in two modules) move
    once and stay tied.
    """
    params: dict[int, tuple[nn.Parameter, torch.device]] = {}
    buffers: list[tuple[nn.Module, str, torch.device]] = []
    try:
        for module in modules:
            for p in module.parameters(recurse=False):
                if id(p) not in params and p.device != torch.device(device):
                    params[id(p)] = (p, p.device)
                    p.data = p.data.to(device)
            for name, b in module.named_buffers(recurse=False):
                if b is not None and b.device != torch.device(device):
                    buffers.append((module, name, b.device))
                    module._buffers[name] = b.to(device)
        yield
    finally:
        for p, home in params.values():
            p.data = p.data.to(home)
        for module, name, home in buffers:
            buf = module._buffers.get(name)
            if buf is not None:
                module._buffers[name] = buf.to(home)


@contextlib.contextmanager
def onloaded(module: nn.Module, device: torch.device | str, *, weights_change: bool = True) -> Iterator[None]:
    """``module`` on ``device`` for the block, then back where it was.

    With ``weights_change=False`` (a pass that only reads the parameters, such as calibration) the
    parameters get their original tensors back instead of a copy from ``device``: no transfer back.
    Buffers (observer statistics, scales) always travel back, changed or new.
    """
    home = next((p.device for p in module.parameters()), torch.device("cpu"))
    if home == torch.device(device):
        yield
        return
    originals = None if weights_change else {id(p): (p, p.data) for p in module.parameters()}
    module.to(device)
    try:
        yield
    finally:
        if originals is None:
            module.to(home)
        else:
            for p, data in originals.values():
                p.data = data
            module.to(home)  # the buffers; parameters are home already
