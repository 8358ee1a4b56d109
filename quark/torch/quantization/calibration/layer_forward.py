"""Whole-model forwards run one decoder layer at a time, for models that are not on one device (layer 6).

When the model sits in CPU memory (or is spread over devices) and a *compute device* does the work,
``model(batch)`` either fails on mixed devices or would move every layer once per batch. Here the
loop is turned inside out: the inputs of the first decoder layer are captured for every batch; then
each layer in turn moves to the compute device, runs every batch and moves back, and its outputs
are the next layer's inputs. The quantizers inside a layer run exactly as in a whole-model forward
(observing, fake-quantizing), so calibration records the statistics the whole-model forward would.

What follows the last decoder layer (final norm, ``lm_head``) runs in one more forward of the model
in which every decoder layer returns the hidden states already computed for that batch; the modules
outside the decoder layers sit on the compute device for that pass only. It runs only when asked
(a quantizer outside the decoder layers still observes, or the caller wants the model's outputs).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quark.torch.quantization.calibration.batches import model_inputs
from quark.torch.quantization.calibration.batching import call_batch, checked_merge, split_like
from quark.torch.quantization.calibration.layerwise import (
    _layer_call,
    _layer_inputs,
    capture_decoder_inputs,
    find_decoder_layers,
    layer_output_tensor,
)

logger = logging.getLogger(__name__)

__all__ = ["forward_layerwise", "modules_outside", "normalize_device", "on_device", "tensors_moved"]


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


class _ReturnsComputed:
    """Stands in for a decoder layer's forward: returns the hidden states computed layer by layer."""

    def __init__(self, template: Any) -> None:
        self.hidden: torch.Tensor | None = None
        self.rest: tuple | None = None
        if isinstance(template, (tuple, list)):
            if any(isinstance(x, torch.Tensor) for x in template[1:]):
                raise RuntimeError("the decoder layers return more tensors than the hidden states; the layer-by-layer "
                                   "forward cannot replay the rest of the model")
            self.rest = tuple(template[1:])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hidden if self.rest is None else (self.hidden, *self.rest)


@torch.no_grad()
def forward_layerwise(
    model: nn.Module,
    batches: Sequence[Any],
    device: torch.device | str,
    *,
    decoder_path: str | None = None,
    merge: bool = False,
    tail: Callable[[int, Any], None] | None = None,
    run_tail: bool = False,
    desc: str = "Calibrating",
) -> None:
    """Run ``model`` on every batch, one decoder layer at a time on ``device``.

    ``merge``: the caller's quantizers record the same statistics from merged batches (and from a
    batch seen twice), so each layer may run the batches merged (:mod:`batching`; checked on the
    first layer). ``run_tail`` (or a ``tail`` callback, which receives each batch's model output)
    runs the modules after the decoder layers as well. Each layer goes back to where it was after
    its turn; the hidden states between layers stay on ``device``.
    """
    device = normalize_device(device)
    _, layers = find_decoder_layers(model, decoder_path)
    outside = modules_outside(model, layers)
    cache = capture_decoder_inputs(model, batches, layers, offload=device)
    hidden = [a[0] if a else None for a in cache.args]
    verdict: bool | None = None if merge else False
    template: Any = None
    with tqdm(total=len(layers), desc=desc, unit="layer", leave=False) as bar:
        for i, layer in enumerate(layers):
            home = next(layer.parameters()).device
            layer.to(device)
            try:
                inputs = _layer_inputs(cache.args, cache.kwargs_for(layer), hidden, device)
                runs, verdict = checked_merge(inputs, functools.partial(_layer_call, layer), verdict, device,
                                              f"{desc}: {type(layer).__name__}")
                outs = []
                for args, kwargs in runs:
                    raw = layer(*args, **kwargs)
                    if i == len(layers) - 1 and template is None:
                        template = raw
                    out = layer_output_tensor(raw)
                    if torch.isnan(out).any():
                        raise RuntimeError(f"NaN in the outputs of decoder layer {i}; the run was stopped")
                    outs.append(out)
                hidden = outs if runs is inputs else split_like(outs, runs, [call_batch(c) for c in inputs])
                del inputs, runs, outs
            finally:
                layer.to(home)
            bar.update(1)
    if tail is None and not run_tail:
        return
    replay = _ReturnsComputed(template)
    for layer in layers:
        layer.forward = replay  # type: ignore[method-assign]
    try:
        with tensors_moved(outside, device):
            extra = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
            for index, batch in enumerate(batches):
                replay.hidden = hidden[index]
                args, kwargs = model_inputs(batch, device, index)
                output = model(*args, **{**extra, **kwargs})
                if tail is not None:
                    tail(index, output)
    finally:
        for layer in layers:
            del layer.forward
