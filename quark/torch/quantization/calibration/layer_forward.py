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

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quark.torch.quantization.calibration import batching
from quark.torch.quantization.calibration.batches import model_inputs
from quark.torch.quantization.calibration.batching import (
    Call,
    call_batch,
    merging_enabled,
    model_pass_runs,
    same_outputs,
    split_like,
)
from quark.torch.quantization.calibration.layerwise import (
    _layer_call,
    _layer_inputs,
    capture_decoder_inputs,
    find_decoder_layers,
    layer_output_tensor,
    move_to,
)
from quark.torch.quantization.calibration.oom import CallsOnDevice, free_device_memory
from quark.torch.quantization.calibration.placement import modules_outside, normalize_device, onloaded, tensors_moved

logger = logging.getLogger(__name__)

__all__ = ["forward_layerwise"]


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


def _merged_runs(layer: nn.Module, inputs: list[Call], verdict: bool | None, device: torch.device,
                 desc: str) -> tuple[list[Call], bool | None]:
    """The calls to run through ``layer``: merged as the whole-model pass merges them (same grouping,
    so the same float results), once the first layer showed that merging keeps its outputs."""
    if verdict is False or not merging_enabled(device):
        return inputs, verdict
    plan = model_pass_runs(inputs, min(batching.MERGE_TOKENS, batching.MODEL_MERGE_TOKENS))
    if plan is None:
        return inputs, verdict
    head, rest = plan
    if verdict is None:
        verdict = same_outputs(functools.partial(_layer_call, layer), head, inputs[:2])
        if not verdict:
            logger.info("%s: %s changes its output when calibration batches are merged; running them one by one",
                        desc, type(layer).__name__)
            return inputs, False
    return [head, *rest], verdict


def _run_layer(layer: nn.Module, runs: Sequence[Call], index: int, to_cpu: bool = False
               ) -> list[tuple[torch.Tensor, Any]]:
    """``(hidden states, raw output)`` of ``layer`` for each call (states moved to the CPU with
    ``to_cpu``); NaN stops the run."""
    results = []
    for args, kwargs in runs:
        raw = layer(*args, **kwargs)
        out = layer_output_tensor(raw)
        if torch.isnan(out).any():
            raise RuntimeError(f"NaN in the outputs of decoder layer {index}; the run was stopped")
        results.append((out.to("cpu") if to_cpu else out, raw if len(results) == 0 else None))
    return results


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
    with tensors_moved(outside, device, weights_change=False, on_use=True):
        cache = capture_decoder_inputs(model, batches, layers, offload=device, device=device)
    hidden, cache = cache.without_hidden()
    verdict: bool | None = None if merge else False
    template: Any = None
    on_cpu = False  # after running out of device memory: activations in CPU memory, moved per call
    with tqdm(total=len(layers), desc=desc, unit="layer", leave=False) as bar:
        for i, layer in enumerate(layers):
            with onloaded(layer, device, weights_change=False):
                inputs = _layer_inputs(cache.args, cache.kwargs_for(layer), hidden, "cpu" if on_cpu else device)
                runs, verdict = (inputs, verdict) if on_cpu else _merged_runs(layer, inputs, verdict, device, desc)
                while True:
                    try:
                        outs = _run_layer(layer, CallsOnDevice(runs, device) if on_cpu else runs, i, on_cpu)
                        break
                    except torch.OutOfMemoryError:
                        free_device_memory(device)
                        if runs is not inputs:
                            logger.warning("a merged calibration batch ran out of device memory in decoder layer "
                                           "%d; running the batches one by one from here on", i)
                            runs, verdict = inputs, False
                        elif not on_cpu and merge:  # observers record a batch seen twice as once: retry it
                            logger.warning("decoder layer %d ran out of device memory; keeping the calibration "
                                           "activations in CPU memory from here on (each batch moved to the "
                                           "device while it runs)", i)
                            on_cpu = True
                            inputs = runs = [move_to(c, "cpu") for c in inputs]
                        else:
                            raise
                if i == len(layers) - 1:
                    template = outs[0][1]
                outs = [out for out, _ in outs]
                hidden = outs if runs is inputs else split_like(outs, runs, [call_batch(c) for c in inputs])
                del inputs, runs, outs
            bar.update(1)
    if on_cpu:
        hidden = [h.to(device) if h is not None else None for h in hidden]
    if tail is None and not run_tail:
        return
    replay = _ReturnsComputed(template)
    for layer in layers:
        layer.forward = replay  # type: ignore[method-assign]
    try:
        with tensors_moved(outside, device, weights_change=False, on_use=True):
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
