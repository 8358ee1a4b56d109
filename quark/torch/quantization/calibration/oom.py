"""Running out of device memory inside a decoder layer: retried in smaller pieces (layer 6).

The layer-by-layer paths keep one decoder layer and its calibration activations on the compute
device. When that runs out of memory, the layer is tried again with less on the device: first
with the calibration batches one by one instead of merged (:mod:`batching`), then with the
activations in CPU memory, each call moved to the device only while it runs. Layers already done
stay done; each retry is logged. A retry first undoes what the failed attempt did to the layer
(its weights from the runner's backup, the steps' statistics through their ``forget_layer``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from quark.torch.quantization.calibration.placement import move_to

logger = logging.getLogger(__name__)

__all__ = ["CallsOnDevice", "LayerRetry", "free_device_memory"]

Call = tuple[tuple, dict]


class CallsOnDevice(Sequence[Call]):
    """Layer calls held in CPU memory; each is moved to ``device`` when it is read."""

    def __init__(self, calls: Sequence[Call], device: torch.device | str) -> None:
        self.calls = list(calls)
        self.device = device

    def __len__(self) -> int:
        return len(self.calls)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [move_to(c, self.device) for c in self.calls[index]]
        return move_to(self.calls[index], self.device)

    def __iter__(self) -> Iterator[Call]:
        for call in self.calls:
            yield move_to(call, self.device)


def free_device_memory(device: torch.device | str) -> None:
    """Return the caching allocator's free blocks (after an out-of-memory error)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


class LayerRetry:
    """What the next attempt at one decoder layer changes after an out-of-memory error.

    The runner sets ``merged`` (this attempt ran merged calls) and ``applying`` (the steps are
    changing the layer); :meth:`after` decides the next attempt or re-raises.
    """

    def __init__(self, name: str, steps: Sequence[Any], backup: Any, desc: str) -> None:
        self.name = name
        self.steps = steps
        self.backup = backup
        self.desc = desc
        self.unmerged = False
        self.activations_on_cpu = False
        self.merged = False
        self.applying = False

    def after(self, error: BaseException, layer: torch.nn.Module, device: torch.device | str) -> None:
        """Prepare the next attempt after ``error`` (out of memory), or raise it when none is left."""
        forget = [getattr(step, "forget_layer", None) for step in self.steps]
        if self.activations_on_cpu or any(f is None for f in forget):
            raise error
        if self.applying and not self.backup.restore_module(layer):
            raise error  # the layer's weights are partly changed and there is no copy to start again from
        free_device_memory(device)
        for f in forget:
            f()
        self.applying = False
        if self.merged:
            self.unmerged, self.merged = True, False
            logger.warning("%s: decoder layer %s ran out of device memory with merged calibration batches; "
                           "retrying it with the batches one by one", self.desc, self.name)
        else:
            self.activations_on_cpu = True
            logger.warning("%s: decoder layer %s ran out of device memory; retrying it with the calibration "
                           "activations in CPU memory (each batch moved to the device while it runs)",
                           self.desc, self.name)
