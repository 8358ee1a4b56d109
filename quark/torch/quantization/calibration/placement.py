"""Where a model's tensors are, and moving parts of it to a compute device and back (layer 6).

A model may sit on the compute device, in CPU memory, spread over devices, or on disk (built on the
meta device with :class:`~quark.torch.quantization.calibration.weight_source.DiskWeights`); the
layer-by-layer paths move one decoder layer at a time to the compute device, and the modules outside
the decoder layers (embeddings, final norm, ``lm_head``) only for the passes that need them. For a
model on disk, "moving" reads the parameters from the checkpoint or the offload folder, and moving
back writes changed ones to the offload folder and leaves the meta device in their place.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from quark.torch.quantization.calibration.transfer import transfer
from quark.torch.quantization.calibration.weight_source import has_meta_parameters, release_host_memory, source_of

__all__ = ["OVERLAP_LAYER_COPIES", "LayerMover", "LayerPrefetch", "in_cpu_memory", "layer_mover", "loaded_on_use",
           "modules_outside", "move_to", "normalize_device", "on_device", "onloaded", "placement_units", "probing",
           "tensors_moved", "unit_read"]

def move_to(obj: Any, device: torch.device | str, keep_pinned: bool = False) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device`` (other values unchanged) with
    :func:`transfer` (``keep_pinned``: copies from a GPU to the CPU stay in page-locked memory)."""
    if isinstance(obj, torch.Tensor):
        return transfer(obj, device, keep_pinned=keep_pinned)
    if isinstance(obj, tuple):
        return tuple(move_to(o, device, keep_pinned) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device, keep_pinned) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device, keep_pinned) for k, v in obj.items()}
    return obj


def _placed_tensors(module: nn.Module, params: bool = True
                    ) -> Iterator[tuple[tuple[int, str], Any, torch.Tensor]]:
    """Each parameter of ``module`` (tied ones once) and each buffer as ``(key, holder, tensor)``: a parameter's key
    is ``(id(p), "")`` and its holder the parameter (its tensor ``p.data``), a buffer's ``(id(sub), name)`` and its
    holder the module owning it. The keys of :meth:`LayerPrefetch.take`'s copies, which :func:`_module_to` uses."""
    seen: set[int] = set()
    for sub in module.modules():
        if params:
            for p in sub.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (id(p), ""), p, p.data
        for name, b in sub._buffers.items():
            if b is not None:
                yield (id(sub), name), sub, b


def _module_to(module: nn.Module, device: torch.device | str, params: bool = True,
               ready: dict[tuple[int, str], torch.Tensor] | None = None) -> None:
    """``module.to(device)`` (parameters through ``.data``, so tied ones stay tied), each tensor moved with
    :func:`transfer`, or taken from ``ready`` (:meth:`LayerPrefetch.take`); ``params=False`` moves the buffers
    only."""
    device = torch.device(device)
    ready = ready or {}
    for key, holder, tensor in _placed_tensors(module, params):
        if tensor.device == device:
            continue
        copy = ready.get(key)
        moved = copy if copy is not None else transfer(tensor, device)
        if key[1]:
            holder._buffers[key[1]] = moved
        else:
            holder.data = moved


#: Whether modules in CPU memory cross to and from a GPU compute device on a background thread while it computes
#: (:class:`LayerMover`: the next decoder layer read ahead, a finished one written back; the runner's layers and
#: ``freeze``'s placement units); ``QUARK_OVERLAP_COPIES=0``: each copy when its turn comes, on the main thread.
OVERLAP_LAYER_COPIES = os.environ.get("QUARK_OVERLAP_COPIES", "1") != "0"


def layer_mover(device: torch.device | str, trim: bool = True) -> LayerMover | None:
    """A :class:`LayerMover` for a CUDA compute ``device`` (None elsewhere, or with the overlap off)."""
    return LayerMover(device, trim) if OVERLAP_LAYER_COPIES and torch.device(device).type == "cuda" else None


def in_cpu_memory(module: nn.Module) -> bool:
    """Whether every parameter and buffer of ``module`` is in CPU memory (none on disk), and it has some."""
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type == "cpu" for t in tensors)


class LayerMover:
    """Moves decoder layers between CPU memory and a CUDA device on one background thread and a side stream,
    while the device computes: :meth:`read_ahead` copies the next layer there ahead of its turn, :meth:`write_back`
    brings a finished layer home. A layer in ordinary CPU memory crosses at ~5-7 GB/s and the thread making the
    copy waits for it: on an H100, an 8B layer's ~70 ms to the device and ~60 ms back (staging included) were
    time the device stood idle at every layer. Jobs run in order, so a read-ahead starts after the previous
    layer's write-back (its device memory freed first). :meth:`wait` blocks until every job is done and raises
    the first error of a write-back. With ``trim`` each write-back ends by returning freed heap memory to the
    system (``malloc_trim``, as the runner did after each layer; it holds glibc's locks while it walks the heap,
    so passes of short units such as ``freeze``'s do without).
    """

    def __init__(self, device: torch.device | str, trim: bool = True) -> None:
        self.device = normalize_device(device)
        self.trim = trim
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quark-layer-mover")
        self._stream: torch.cuda.Stream | None = None
        self._writes: list[Future] = []
        self._ahead: LayerPrefetch | None = None

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def read_ahead(self, module: nn.Module) -> None:
        """Start copying ``module`` to the device (after the jobs already queued) when it sits in CPU memory; its
        turn's :meth:`take` hands the copies over (an earlier read-ahead not taken is dropped)."""
        self._drop_ahead()
        if in_cpu_memory(module):
            self._ahead = LayerPrefetch(module, self)

    def take(self, module: nn.Module) -> dict[tuple[int, str], torch.Tensor] | None:
        """The copies read ahead for ``module`` (:meth:`LayerPrefetch.take`), for :func:`onloaded`'s ``ready``; None
        when it was not read ahead."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        if ahead.module is not module:
            ahead.drop()
            return None
        return ahead.take()

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.drop()
            self._ahead = None

    def write_back(self, module: nn.Module, home: torch.device) -> None:
        """Move ``module`` (on the device) to ``home`` once the work queued on the current stream is done; the
        caller leaves ``module`` alone until :meth:`wait`."""
        queued = torch.cuda.Event()
        queued.record(torch.cuda.current_stream(self.device))
        self._writes.append(self._worker.submit(self._write, module, home, queued))

    def _write(self, module: nn.Module, home: torch.device, queued: torch.cuda.Event) -> None:
        stream = self._side_stream()
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            stream.wait_event(queued)
            _module_to(module, home)  # synchronous per tensor: each device copy is read before it is freed
        if self.trim:  # the freed staging and the tensors replaced (glibc keeps them otherwise)
            release_host_memory()

    def wait(self) -> None:
        """Block until every job is done; the first write-back error is raised (after all have finished)."""
        writes, self._writes = self._writes, []
        errors = [f.exception() for f in writes]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def close(self) -> None:
        """Drop what was read ahead, wait for the jobs (errors are the caller's to have seen through :meth:`wait`)
        and stop the worker."""
        self._drop_ahead()
        for f in self._writes:
            f.exception()
        self._writes = []
        self._worker.shutdown(wait=True)


class LayerPrefetch:
    """Copies of a module's CPU parameters and buffers on a CUDA device, made by a :class:`LayerMover`'s worker on
    its side stream.

    :meth:`take` hands over the copies for :func:`onloaded`'s ``ready``, except of tensors that were replaced or
    changed in place through autograd's view in the meantime (a change through ``.data`` is not seen: steps
    change only the layer they are given); :meth:`drop` discards them (out of device memory, or an error).
    """

    def __init__(self, module: nn.Module, mover: LayerMover) -> None:
        self.module = module
        self.device = mover.device
        self._mover = mover
        # (key, holder, tensor, its version): the tensor held keeps its memory from being reused meanwhile
        self._sources: list[tuple[tuple[int, str], Any, torch.Tensor, int]] = [
            (key, holder, tensor, (tensor if key[1] else holder)._version)
            for key, holder, tensor in _placed_tensors(module) if tensor.device.type == "cpu"]
        self._copies: dict[tuple[int, str], torch.Tensor] = {}
        self._event: torch.cuda.Event | None = None
        self._done = mover._worker.submit(self._copy)

    def _copy(self) -> None:
        try:
            stream = self._mover._side_stream()
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                for key, _, tensor, _ in self._sources:
                    self._copies[key] = tensor.to(self.device, non_blocking=tensor.is_pinned())
                self._event = torch.cuda.Event()
                self._event.record(stream)
        except BaseException:  # out of memory included: the layer is then copied when its turn comes
            self._copies.clear()
            self._event = None

    @staticmethod
    def _unchanged(key: tuple[int, str], holder: Any, tensor: torch.Tensor, version: int) -> bool:
        if key[1]:
            return holder._buffers.get(key[1]) is tensor and tensor._version == version
        return holder.data_ptr() == tensor.data_ptr() and holder._version == version

    def take(self) -> dict[tuple[int, str], torch.Tensor]:
        """The copies, for use on the current stream of the device (empty when the prefetch failed)."""
        self._done.result()
        if self._event is None:
            self._sources.clear()
            return {}
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self._event)
        ready = {}
        for key, holder, tensor, version in self._sources:
            copy = self._copies.get(key)
            if copy is not None and self._unchanged(key, holder, tensor, version):
                copy.record_stream(current)  # made on the side stream, used and freed on this one
                ready[key] = copy
        self._copies.clear()
        self._sources.clear()
        return ready

    def drop(self) -> None:
        """Wait for the copies and free them."""
        self._done.result()
        self._copies.clear()
        self._sources.clear()


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


def _disk_source(modules: Sequence[nn.Module]) -> Any:
    """The DiskWeights behind ``modules`` when one of them has parameters on the meta device."""
    for module in modules:
        if has_meta_parameters(module):
            found = source_of(module)
            if found is not None:
                return found[0]
    return None


@contextlib.contextmanager
def tensors_moved(modules: Sequence[nn.Module], device: torch.device | str, *,
                  weights_change: bool = True, on_use: bool = False) -> Iterator[None]:
    """Move the direct parameters and buffers of ``modules`` to ``device``; put each back where it was.

    Parameters are moved through ``.data`` so that tied weights (one Parameter in two modules) move
    once and stay tied. With ``weights_change=False`` (the block only reads them) each parameter gets its
    original tensor back (nothing is copied back from ``device``) and a model on disk does not write
    them back; with ``on_use`` (the block only runs forwards) it reads each module
    when its forward first starts and drops it at the end of the block, so a pass reads only the
    modules it runs, each once.
    """
    source = _disk_source(modules)
    if source is not None:
        device = normalize_device(device)
        if on_use and not weights_change:
            own = [m for m in modules if any(True for _ in m.parameters(recurse=False))]
            rest = [m for m in modules if m not in own]  # buffers only (rotary tables): moved now
            with source.loaded(rest, device, recurse=False, weights_change=False), \
                    _read_when_run([(m, functools.partial(source.loaded, [m], device, recurse=False,
                                                          weights_change=False)) for m in own], keep=True):
                yield
            return
        with source.loaded(modules, device, recurse=False, weights_change=weights_change):
            yield
        return
    params: dict[int, tuple[nn.Parameter, torch.device | torch.Tensor]] = {}
    buffers: list[tuple[nn.Module, str, torch.device]] = []
    try:
        for module in modules:
            for p in module.parameters(recurse=False):
                if id(p) not in params and p.device != torch.device(device):
                    # a block that only reads the parameters gets the original tensors back: nothing crosses
                    # back (the embeddings and lm_head of an 8B model are 2 GiB)
                    params[id(p)] = (p, p.device if weights_change else p.data)
                    p.data = transfer(p.data, device)
            for name, b in module.named_buffers(recurse=False):
                if b is not None and b.device != torch.device(device):
                    buffers.append((module, name, b.device))
                    module._buffers[name] = transfer(b, device)
        yield
    finally:
        for p, home in params.values():
            p.data = home if isinstance(home, torch.Tensor) else transfer(p.data, home)
        for module, name, home in buffers:
            buf = module._buffers.get(name)
            if buf is not None:
                module._buffers[name] = transfer(buf, home)


@contextlib.contextmanager
def onloaded(module: nn.Module, device: torch.device | str, *, weights_change: bool = True,
             ready: dict[tuple[int, str], torch.Tensor] | None = None,
             mover: LayerMover | None = None) -> Iterator[None]:
    """``module`` on ``device`` for the block, then back where it was.

    With ``weights_change=False`` (a pass that only reads the parameters, such as calibration) the
    parameters get their original tensors back instead of a copy from ``device``: no transfer back.
    Buffers (observer statistics, scales) always travel back, changed or new. A module of a model on
    disk is read from its weight source and written back to the offload folder (``weights_change``).
    ``ready``: copies already on ``device`` (:meth:`LayerPrefetch.take`), used instead of copying again.
    ``mover``: a block that ends without an error hands the module to :meth:`LayerMover.write_back` (the caller
    leaves it alone until :meth:`LayerMover.wait`) instead of moving it back before returning.
    """
    source = _disk_source([module])
    if source is not None:
        with source.loaded([module], normalize_device(device), recurse=True, weights_change=weights_change):
            yield
        return
    home = next((p.device for p in module.parameters()), torch.device("cpu"))
    if home == torch.device(device):
        yield
        return
    originals = None if weights_change else {id(p): (p, p.data) for p in module.parameters()}
    _module_to(module, device, ready=ready)
    failed = True
    try:
        yield
        failed = False
    finally:
        if originals is None and mover is not None and not failed:
            mover.write_back(module, home)
        elif originals is None:
            _module_to(module, home)
        else:
            for p, data in originals.values():
                p.data = data
            _module_to(module, home, params=False)


@contextlib.contextmanager
def loaded_on_use(model: nn.Module, device: torch.device | str, layers: nn.ModuleList) -> Iterator[None]:
    """A model on disk runs whole-model forwards: each decoder layer (of ``layers``) and each module
    outside them is read onto ``device`` when its forward starts and dropped when it ends. A model
    not on disk is left as it is."""
    if _disk_source([model]) is None:
        yield
        return
    outside = [m for m in modules_outside(model, layers) if any(True for _ in m.parameters(recurse=False))]
    units = [(layer, functools.partial(onloaded, layer, device, weights_change=False)) for layer in layers]
    units += [(m, functools.partial(tensors_moved, [m], device, weights_change=False)) for m in outside]
    with _read_when_run(units):
        yield


@contextlib.contextmanager
def _read_when_run(units: list[tuple[nn.Module, Callable[[], contextlib.AbstractContextManager]]],
                   keep: bool = False) -> Iterator[None]:
    """Each ``(module, context)``: the context entered when the module's forward starts, left when it ends
    (with ``keep``: left at the end of the block, so a module run once per calibration batch, such as the
    embeddings, is read once)."""
    stacks: dict[int, contextlib.ExitStack] = {}
    contexts = {id(module): context for module, context in units}

    def enter(module: nn.Module, args: Any) -> None:
        if id(module) in stacks:  # kept from an earlier forward
            return
        stack = contextlib.ExitStack()
        stack.enter_context(contexts[id(module)]())
        stacks[id(module)] = stack

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if keep:
            return
        stack = stacks.pop(id(module), None)
        if stack is not None:
            stack.close()

    handles = []
    try:
        for unit, _ in units:
            handles.append(unit.register_forward_pre_hook(enter))
            handles.append(unit.register_forward_hook(leave, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in stacks.values():
            stack.close()


_PROBING: set[int] = set()  # models inside a probing block (a nested probe, e.g. rotation's group discovery, reuses it)


@contextlib.contextmanager
def probing(model: nn.Module, layers: nn.ModuleList) -> Iterator[None]:
    """For probes that inspect a whole model (structure discovery): a model on disk gets its first decoder
    layer and the modules outside the layers read into CPU memory for the block, and every other layer
    when it runs. Other models are left as they are."""
    if _disk_source([model]) is None or id(model) in _PROBING:  # not on disk, or inside a probe already
        yield
        return
    _PROBING.add(id(model))
    try:
        with onloaded(layers[0], "cpu", weights_change=False), \
                tensors_moved(modules_outside(model, layers), "cpu", weights_change=False), \
                loaded_on_use(model, "cpu", layers):
            yield
    finally:
        _PROBING.discard(id(model))


def placement_units(model: nn.Module, decoder: tuple[str, nn.ModuleList] | None) -> list[tuple[str, nn.Module, bool]]:
    """``(name, module, whole)`` of what moves as one piece: each decoder layer of ``decoder`` (its path
    and list; ``whole``: with its sub-modules), then each module outside the layers that holds
    parameters of its own (alone). Without decoder layers, every module holding parameters."""
    if decoder is None:
        return [(name, m, False) for name, m in model.named_modules() if any(True for _ in m.parameters(False))]
    path, layers = decoder
    outside = {id(m) for m in modules_outside(model, layers)}
    units: list[tuple[str, nn.Module, bool]] = [(f"{path}.{i}", layer, True) for i, layer in enumerate(layers)]
    units += [(name, m, False) for name, m in model.named_modules()
              if id(m) in outside and any(True for _ in m.parameters(recurse=False))]
    return units


def unit_read(module: nn.Module, device: torch.device | str, whole: bool) -> contextlib.AbstractContextManager:
    """A placement unit's tensors on ``device`` for a block that only reads them: with its sub-modules
    (``whole``, a decoder layer: :func:`onloaded`) or its own tensors (a module outside the layers:
    :func:`tensors_moved`)."""
    if whole:
        return onloaded(module, device, weights_change=False)
    return tensors_moved([module], device, weights_change=False)
