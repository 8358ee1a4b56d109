"""The one layer-by-layer runner every calibration algorithm uses (layer 6).

The runner captures the inputs of the first decoder layer (positional and keyword arguments,
exactly as the model passes them, caches off), then for each decoder layer in turn: moves it to
the compute device, runs the captured inputs through it while hooks feed the steps' ``collect``,
lets every step ``apply`` its change, recomputes the layer's outputs (from the changed layer) as
the next layer's inputs, checks them for NaN, and moves the layer back. Only one decoder layer
and its activations sit on the compute device at a time.

No code here names a keyword argument of a decoder layer: whatever the model passed to layer 0
(attention masks, position ids, rotary embeddings, ...) is replayed verbatim. Layers whose
``attention_type`` differs from layer 0 (sliding-window / full alternation) get the keyword
arguments captured at the first layer of their own type.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file
from torch import nn
from torch.profiler import record_function
from tqdm.auto import tqdm

from quark.torch.quantization.calibration.batches import model_device, model_inputs
from quark.torch.quantization.calibration.batching import call_batch, checked_merge, merging_enabled, split_like
from quark.torch.quantization.calibration.oom import CallsOnDevice, LayerRetry
from quark.torch.quantization.calibration.placement import (
    in_cpu_memory,
    layer_mover,
    modules_outside,
    move_to,
    onloaded,
    tensors_moved,
)
from quark.torch.quantization.calibration.safetensors_header import save_streamed
from quark.torch.quantization.calibration.transfer import release_pinned_cache, transfer
from quark.torch.quantization.calibration.weight_source import has_meta_parameters, release_host_memory, source_of

logger = logging.getLogger(__name__)

__all__ = [
    "CapturedInputs",
    "LayerStep",
    "ModelBackup",
    "capture_decoder_inputs",
    "collecting",
    "find_decoder_layers",
    "float_linears",
    "forward_until_seen",
    "move_to",
    "run_layerwise",
]


class _StopForward(Exception):
    """Private signal that stops the model's forward once the needed inputs are captured."""


class LayerStep(Protocol):
    """One algorithm's per-layer work, driven by :func:`run_layerwise`.

    ``targets`` names the sub-modules (relative to the decoder layer) whose forwards ``collect``
    should see; ``apply`` changes the layer in place once all calibration batches were seen. It
    receives the layer's inputs (``[(args, kwargs)]`` on the compute device) so search algorithms
    can re-run the layer or parts of it. The runner merges calibration batches along the batch
    dimension (``batching.py``) when the layer's outputs allow it; a step that needs each batch as
    recorded (statistics taken per batch) sets ``keeps_calls_as_recorded = True``. A step with a
    ``forget_layer()`` method (dropping what it collected for the current layer) lets the runner
    retry a layer that ran out of device memory (:mod:`oom`). A step whose ``collect`` needs nothing
    but its targets' calls sets ``collects_targets_only = True``: each call then stops once every
    target has run. A step with a ``prepare(device)`` method has it called once before the decoder's inputs
    are captured, to start work that can run alongside (AWQ compiles its Triton kernels).
    """

    def targets(self, layer: nn.Module, index: int) -> dict[str, nn.Module]: ...

    def collect(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None: ...

    def apply(self, layer: nn.Module, index: int, inputs: list[tuple[tuple, dict]]) -> None: ...


def find_decoder_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(path, layers)`` of the decoder blocks.

    With ``path`` (e.g. ``"model.layers"``) the named ModuleList is used; otherwise the largest
    ModuleList whose children all have the same class is taken, among those not nested inside
    another such list (a mixture-of-experts block's expert list can outnumber the decoder layers)
    and, when the model names its text decoder (``get_decoder()``), inside it (a vision tower's
    layers can outnumber the language model's).
    """
    if path:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"model_decoder_layers={path!r} names no module of the model") from None
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"model_decoder_layers={path!r} is a {type(layers).__name__}, not an nn.ModuleList"
            )
        return path, layers
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1]
    decoder = _text_decoder(model)
    if decoder is not None:  # a vision-language model: the language model's layers, not the vision tower's
        inside = {id(m) for m in decoder.modules()}
        candidates = [(name, module) for name, module in candidates if id(module) in inside] or candidates
    outer = [(name, module) for name, module in candidates
             if not any(other != name and name.startswith(other + ".") for other, _ in candidates)]
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in outer:
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"no decoder layers found in {type(model).__name__}: no nn.ModuleList of identical "
            "blocks; set model_decoder_layers in the algorithm config"
        )
    return best


def _text_decoder(model: nn.Module) -> nn.Module | None:
    """The language decoder transformers' ``get_decoder()`` names, when the model has one."""
    get_decoder = getattr(model, "get_decoder", None)
    if not callable(get_decoder):
        return None
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return None
    return decoder if isinstance(decoder, nn.Module) and decoder is not model else None


@dataclass
class CapturedInputs:
    """Inputs of the decoder layers, per calibration batch.

    ``args[b]`` / ``kwargs[b]`` are what layer 0 received for batch ``b``; ``kwargs_by_type``
    maps an ``attention_type`` to the per-batch keyword arguments captured at the first layer
    of that type (only for models whose layers differ in ``attention_type``).
    """

    args: list[tuple]
    kwargs: list[dict]
    kwargs_by_type: dict[Any, list[dict]]

    def kwargs_for(self, layer: nn.Module) -> list[dict]:
        kind = getattr(layer, "attention_type", None)
        return self.kwargs_by_type.get(kind, self.kwargs)

    def without_hidden(self) -> tuple[list, CapturedInputs]:
        """``(hidden states, the inputs without them)``: each batch's first positional argument (None for a
        batch that passed it by keyword), and a copy of these inputs holding only the other arguments, so the
        caller's list is the one reference to layer 0's hidden states (freed once the caller moves on)."""
        hidden = [a[0] if a else None for a in self.args]
        return hidden, CapturedInputs([(None, *a[1:]) if a else a for a in self.args], self.kwargs,
                                      self.kwargs_by_type)


@torch.no_grad()
def capture_decoder_inputs(
    model: nn.Module, batches: Sequence[Any], layers: nn.ModuleList, offload: str | torch.device = "cpu",
    device: str | torch.device | None = None,
) -> CapturedInputs:
    """Run ``model`` on each batch until the decoder layers' inputs are known, then stop.

    Caches are turned off (``use_cache=False``). The batches go to ``device`` (default: where the
    model's first parameter is); captured tensors are stored on ``offload``.
    """
    if len(batches) == 0:
        raise ValueError("calibration data is empty: at least one batch is needed")
    first_type = getattr(layers[0], "attention_type", None)
    hook_at: dict[int, Any] = {0: first_type}
    for i, layer in enumerate(layers):
        kind = getattr(layer, "attention_type", None)
        if kind not in hook_at.values():
            hook_at[i] = kind
    last = max(hook_at)
    args_list: list[tuple] = []
    kwargs_list: list[dict] = []
    by_type: dict[Any, list[dict]] = {kind: [] for i, kind in hook_at.items() if i != 0}

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if index == 0:
                args_list.append(move_to(args, offload, keep_pinned=True))
                kwargs_list.append(move_to(kwargs, offload, keep_pinned=True))
            else:
                by_type[hook_at[index]].append(move_to(kwargs, offload, keep_pinned=True))
            if index == last:
                raise _StopForward
            return None

        return hook

    handles = [layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in hook_at]
    device = model_device(model) if device is None else device
    try:
        for index, batch in enumerate(batches):
            args, kwargs = model_inputs(batch, device, index)
            kwargs.setdefault("use_cache", False)
            try:
                model(*args, **kwargs)
            except _StopForward:
                continue
            else:
                raise RuntimeError("the model's forward finished without calling its decoder layers")
    finally:
        for h in handles:
            h.remove()
    return CapturedInputs(args_list, kwargs_list, by_type)


@contextlib.contextmanager
def collecting(layer: nn.Module, step: LayerStep, index: int) -> Iterator[None]:
    """Forward hooks that pass each target module's (args, kwargs, output) to ``step.collect``."""
    handles = []
    try:
        for name, module in step.targets(layer, index).items():
            def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any, _name: str = name) -> None:
                step.collect(_name, mod, args, kwargs, output)

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


class _TargetsSeen(Exception):
    """Private signal that stops a layer call once every module a pass watches has run."""


def forward_until_seen(layer: nn.Module, calls: Iterable[tuple[tuple, dict]], modules: Iterable[nn.Module]) -> None:
    """Run ``layer`` on each call, stopping each call once every module of ``modules`` has run in it.

    For passes that only record those modules' inputs or outputs (hooks registered before this):
    what comes after them in the layer is not computed. A module that does not run in a call lets
    the call finish.
    """
    watched = {id(m) for m in modules}
    seen: set[int] = set()

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        seen.add(id(module))
        if seen >= watched:
            raise _TargetsSeen

    handles = [m.register_forward_hook(hook) for m in {id(m): m for m in modules}.values()]
    try:
        for args, kwargs in calls:
            seen.clear()
            with contextlib.suppress(_TargetsSeen):
                layer(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def _float_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rotation = getattr(self, "input_rotation", None)
    if rotation is not None:
        x = (x @ rotation.to(x.dtype)) / math.sqrt(rotation.shape[0])
    return nn.Linear.forward(self, x)


@contextlib.contextmanager
def float_linears(module: nn.Module) -> Iterator[None]:
    """Run every ``nn.Linear`` subclass inside ``module`` as a plain float linear.

    Quantized linears (QuantLinear) carry quantizers that would observe and fake-quantize during
    the algorithms' own forwards; this bypasses them by shadowing ``forward`` on the instance
    (removed on exit). An online ``input_rotation`` (QuaRot's R4) is still applied: the weight
    expects rotated inputs. Plain ``nn.Linear`` modules are left alone.
    """
    patched = []
    try:
        for m in module.modules():
            # quantized linears only (they carry a weight quantizer): other Linear subclasses keep their own
            # forward (Llama 4's router returns scores and logits)
            if isinstance(m, nn.Linear) and hasattr(m, "weight_quantizer") and "forward" not in m.__dict__:
                m.forward = _float_forward.__get__(m)  # type: ignore[method-assign]
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward


def layer_output_tensor(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor, or the first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise RuntimeError(f"decoder layer returned {type(output).__name__}; expected a tensor or tuple")


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    # Hidden states passed by keyword: replace the first tensor argument with its shape.
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.shape == hidden.shape:
            return args, {**kwargs, key: hidden}
    raise RuntimeError("cannot find the hidden-states argument of the decoder layer to replace")


def _layer_inputs(args_list: Sequence[tuple], kwargs_list: Sequence[dict], states: Sequence[torch.Tensor | None],
                  device: torch.device | str) -> list[tuple[tuple, dict]]:
    """Each batch's (args, kwargs) on ``device`` with its hidden states replaced by ``states``."""
    return [
        _with_hidden(move_to(a, device), move_to(k, device), move_to(h, device))
        if h is not None else (move_to(a, device), move_to(k, device))
        for a, k, h in zip(args_list, kwargs_list, states)
    ]


#: Bytes of one backup file: a module's state is copied and written in pieces of about this size, so
#: saving a whole model holds at most two pieces in host memory.
BACKUP_PIECE_BYTES = 512 * 1024**2


class ModelBackup:
    """Copies of module states taken before an algorithm changes them, for restoring on error.

    The copies go to safetensors files in a temporary folder (``QUARK_BACKUP_DIR`` or the system's
    temporary folder), written by a background thread while the algorithm works, so a run never
    holds a second copy of the model in host memory: at most two pieces of ``BACKUP_PIECE_BYTES``
    wait for the disk. :meth:`restore` reads them back; :meth:`close` deletes them.
    """

    def __init__(self, enabled: bool = True, folder: str | os.PathLike | None = None) -> None:
        self.enabled = enabled
        self._parent = folder if folder is not None else os.environ.get("QUARK_BACKUP_DIR") or None
        self._dir: Path | None = None
        self._saved: list[tuple[nn.Module, list[Path]]] = []
        self._ids: set[int] = set()
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        # Models on disk: the offload folder's index when the first module was saved (its files kept).
        self._disk: list[tuple[Any, dict]] = []
        self._pins = contextlib.ExitStack()

    def _folder(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="quark-backup-", dir=self._parent))
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quark-backup")
        return self._dir

    def _write(self, piece: dict[str, torch.Tensor], path: Path) -> None:
        while len(self._pending) >= 2:
            self._pending.pop(0).result()
        assert self._writer is not None
        # tensor by tensor (the pieces are in CPU memory already; save_file would first copy a whole piece into one
        # bytes object)
        self._pending.append(self._writer.submit(save_streamed, piece, path))

    def save(self, module: nn.Module, copy: bool = True) -> None:
        """Keep the state of ``module`` (once per module). ``copy=False``: its CPU tensors are written as they
        are, without a copy first; the caller guarantees nothing changes them in place meanwhile."""
        if not self.enabled or id(module) in self._ids:
            return
        found = source_of(module) if has_meta_parameters(module) else None
        if found is not None and all(found[0] is not source for source, _ in self._disk):
            self._pins.enter_context(found[0].pinned())
            self._disk.append((found[0], found[0].snapshot()))
        folder = self._folder()
        files: list[Path] = []
        piece: dict[str, torch.Tensor] = {}
        size = 0
        seen: set[int] = set()
        for key, value in module.state_dict(keep_vars=True).items():
            if id(value) in seen or value.device.type == "meta":  # tied: restored through the first key
                continue
            seen.add(id(value))
            # a CPU tensor is copied (the algorithm may change it in place); a GPU one crosses through
            # page-locked memory, kept until the writer thread has saved it
            piece[key] = (transfer(value.detach(), "cpu", keep_pinned=True) if value.is_cuda
                          else value.detach().to("cpu", copy=copy)).contiguous()
            size += value.numel() * value.element_size()
            if size >= BACKUP_PIECE_BYTES:
                files.append(folder / f"{len(self._ids)}-{len(files)}.safetensors")
                self._write(piece, files[-1])
                piece, size = {}, 0
        if piece or not files:
            files.append(folder / f"{len(self._ids)}-{len(files)}.safetensors")
            self._write(piece, files[-1])
        self._saved.append((module, files))
        self._ids.add(id(module))

    def _flush(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    @torch.no_grad()
    def restore(self) -> None:
        """Load every saved state back (once; a second call does nothing), then delete the copies."""
        if not self._saved and not self._disk:
            self.close()
            return
        self._flush()
        for source, snapshot in self._disk:
            source.restore(snapshot)
        for module, files in reversed(self._saved):
            self._load(module, files)
        logger.warning("restored the weights of %d module(s) after a failed run", len(self._saved))
        self.close()

    @staticmethod
    def _load(module: nn.Module, files: list[Path]) -> None:
        on_disk = {name for name, p in module.named_parameters() if p.device.type == "meta"}
        for path in files:  # one piece at a time: never a second copy of the model in memory
            state = load_file(str(path))
            if not on_disk & state.keys():
                module.load_state_dict(state, strict=False)
                continue
            # Saved while it was read from disk: read it again, overwrite, write it back to the offload folder.
            with onloaded(module, "cpu", weights_change=True):
                module.load_state_dict(state, strict=False)

    @torch.no_grad()
    def restore_module(self, module: nn.Module) -> bool:
        """Load the saved state of ``module`` back (keeping the copy); False when none was saved."""
        for saved, files in self._saved:
            if saved is module:
                self._flush()
                self._load(module, files)
                return True
        return False

    def discard(self) -> None:
        """Forget the copies after a successful run without waiting for the disk: writes not yet started are
        cancelled, and a background thread lets the running one end, then deletes the folder (an 8B model's
        32 files at the end of an AWQ run on an H100: ~2 s of the run spent after its last layer)."""
        pending, writer, folder = self._pending, self._writer, self._dir
        self._pending, self._writer, self._dir = [], None, None
        for future in pending:
            future.cancel()

        def cleanup() -> None:
            if writer is not None:
                writer.shutdown(wait=True)
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

        if writer is not None or folder is not None:
            threading.Thread(target=cleanup, name="quark-backup-cleanup").start()
        self.close()

    def close(self) -> None:
        """Forget the copies and delete their folder (after a successful run, or after ``restore``)."""
        try:
            self._flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            self._saved.clear()
            self._ids.clear()
            self._disk.clear()
            self._pins.close()


def _layer_call(layer: nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    return layer_output_tensor(layer(*call[0], **call[1]))


def _check_finite(t: torch.Tensor, where: str) -> None:
    if torch.isnan(t).any():
        raise RuntimeError(f"NaN in the outputs of decoder layer {where}; the run was stopped")


def _layer_pass(layer: nn.Module, i: int, name: str, steps: Sequence[LayerStep], cache: CapturedInputs,
                hidden: list, hidden_float: list, float_steps: list, device: torch.device | str,
                offload: torch.device | str, merge_ok: bool | None, propagate: bool, backup: ModelBackup, desc: str,
                retry: LayerRetry) -> tuple[list, list, bool | None]:
    """One decoder layer (already on ``device``): collect, apply, propagate; returns the next layer's
    hidden states (and float-model hidden states) and the merge verdict."""
    kwargs_list = cache.kwargs_for(layer)
    staged = "cpu" if retry.activations_on_cpu else device
    inputs: list = _layer_inputs(cache.args, kwargs_list, hidden, staged)
    reference, float_inputs = None, []
    if float_steps:
        reference = copy.deepcopy(layer)
        float_inputs = _layer_inputs(cache.args, kwargs_list, hidden_float, staged)
        if retry.activations_on_cpu:
            float_inputs = CallsOnDevice(float_inputs, device)
        for step in float_steps:
            step.set_float_reference(reference, float_inputs)
    with float_linears(layer):
        if retry.activations_on_cpu:
            runs, sizes = CallsOnDevice(inputs, device), None
        else:
            runs, merge_ok = checked_merge(inputs, functools.partial(_layer_call, layer), merge_ok, device,
                                           f"{desc}: {type(layer).__name__}")
            retry.merged = runs is not inputs
            sizes = None
            if runs is not inputs:
                sizes = [call_batch(c) for c in inputs]
                inputs = []  # the merged copies replace them on the device
        for step in steps:
            only_targets = getattr(step, "collects_targets_only", False)  # nothing after its targets matters
            if only_targets and not step.targets(layer, i):
                continue
            with collecting(layer, step, i), record_function(f"quark.collect.{type(step).__name__}"):
                if only_targets:
                    forward_until_seen(layer, runs, step.targets(layer, i).values())
                else:
                    for args, kwargs in runs:
                        layer(*args, **kwargs)
        for step in (s for s in steps if hasattr(s, "reduce")):  # data-parallel ranks: sum statistics
            step.reduce(layer, i)
        with record_function("quark.backup"):
            backup.save(layer)
        retry.applying = True
        for step in steps:
            with record_function(f"quark.apply.{type(step).__name__}"):
                step.apply(layer, i, runs)
        retry.applying = False
        for p in layer.parameters():
            if torch.isnan(p).any():
                raise RuntimeError(f"NaN in the weights of decoder layer {name} after the algorithm")
        if propagate:
            outs = []
            with record_function("quark.propagate"):
                for args, kwargs in runs:
                    out = layer_output_tensor(layer(*args, **kwargs))
                    _check_finite(out, name)
                    outs.append(transfer(out, offload, keep_pinned=True))
            hidden = outs if sizes is None else split_like(outs, runs, sizes)
    if reference is not None:
        with float_linears(reference):
            hidden_float = [transfer(layer_output_tensor(reference(*a, **k)), offload, keep_pinned=True)
                            for a, k in float_inputs]
        for step in float_steps:
            step.set_float_reference(None, [])
    return hidden, hidden_float, merge_ok


#: Bytes of activations a GPU compute device keeps between decoder layers (the layers' inputs, outputs
#: and merged copies: three streams of the captured size, six with a float-model stream); more wait in
#: CPU memory (page-locked) and cross the bus twice per layer and pass. Llama-3-70B's hidden states for 128 x 512
#: tokens are 1 GiB a stream: at 3 GiB they missed by the position embeddings and held ~3 GiB of page-locked host
#: memory in the disk placement (8.45 GiB peak, H100); at most a quarter of the device's memory either way.
ACTIVATIONS_ON_DEVICE_BYTES = 4 * 2**30


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o, seen) for o in obj.values())
    return 0


def _activation_budget(device: torch.device) -> int:
    return min(ACTIVATIONS_ON_DEVICE_BYTES, torch.cuda.get_device_properties(device).total_memory // 4)


def _activation_home(cache: CapturedInputs, device: torch.device | str, streams: int) -> torch.device | str:
    """``device`` when it is a GPU and ``streams`` copies of the captured inputs fit the budget (at most a
    quarter of its memory), else ``"cpu"``."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    seen: set[int] = set()
    stream = _tensor_bytes(cache.args, seen)
    fixed = _tensor_bytes([cache.kwargs, cache.kwargs_by_type], seen)
    return device if streams * stream + fixed <= _activation_budget(device) else "cpu"


def hidden_state_bytes(model: nn.Module, batches: Sequence[Any]) -> int | None:
    """The bytes of the hidden states the decoder's first layer will receive for ``batches`` (their tokens times
    the model's hidden size, in its embeddings' dtype), or None when that cannot be told beforehand (no
    ``config.hidden_size``, no embeddings, a batch of another form than token ids, a dict with ``input_ids`` or a
    sequence starting with them)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(hidden, int) or not isinstance(weight, torch.Tensor):
        return None
    tokens = 0
    for batch in batches:
        if isinstance(batch, dict):
            batch = batch.get("input_ids")
        elif isinstance(batch, (tuple, list)):
            batch = batch[0] if batch else None
        if not isinstance(batch, torch.Tensor) or batch.is_floating_point():
            return None
        tokens += batch.numel()
    return tokens * hidden * weight.element_size()


def _capture_home(model: nn.Module, batches: Sequence[Any], device: torch.device | str,
                  streams: int) -> torch.device | str:
    """Where the capture keeps layer 0's inputs: on a GPU ``device`` when ``streams`` copies of the hidden states
    it will record (:func:`hidden_state_bytes`, with 5% for the other arguments) fit the activations' budget, as
    :func:`_activation_home` will find after it; they then skip a round trip through page-locked memory and the
    synchronisation that each batch's copy to the host costs (Llama-3-8B, 128 x 512 tokens on an H100: ~7 ms a
    batch). Else ``"cpu"``."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    size = hidden_state_bytes(model, batches)
    return device if size is not None and streams * size * 1.05 <= _activation_budget(device) else "cpu"


def _rows_of_one_tensor(hidden: list) -> list:
    """The captured hidden states as consecutive rows of one tensor when they will run merged (on an
    accelerator, all tensors of one trailing shape and dtype), so merging them costs no copy: layer 0
    holds them once, as every later layer holds its inputs (views of the previous layer's outputs)."""
    first = hidden[0] if hidden else None
    if (not isinstance(first, torch.Tensor) or first.dim() < 2 or not merging_enabled(first.device)
            or not all(isinstance(h, torch.Tensor) and h.device == first.device and h.dtype == first.dtype
                       and h.shape[1:] == first.shape[1:] for h in hidden)):
        return hidden
    whole = torch.cat(hidden, 0)
    return list(whole.split([h.shape[0] for h in hidden], 0))


def _cpu_layer_for(layer: nn.Module, device: torch.device | str) -> bool:
    """Whether ``layer`` sits wholly in CPU memory (none of it on disk) and runs on another device."""
    return torch.device(device).type != "cpu" and in_cpu_memory(layer)


def _cache_on(cache: CapturedInputs, where: torch.device | str) -> CapturedInputs:
    return CapturedInputs(move_to(cache.args, where, True), move_to(cache.kwargs, where, True),
                          {kind: move_to(kw, where, True) for kind, kw in cache.kwargs_by_type.items()})


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    batches: Sequence[Any],
    steps: Sequence[LayerStep],
    device: torch.device | str,
    decoder_path: str | None = None,
    offload: torch.device | str | None = None,
    propagate: bool = True,
    backup: ModelBackup | None = None,
    desc: str = "layerwise",
) -> None:
    """Drive ``steps`` over the decoder layers of ``model`` one layer at a time.

    The activations between layers wait on ``offload``; by default on a GPU ``device`` when they fit
    :data:`ACTIVATIONS_ON_DEVICE_BYTES`, else in (page-locked) CPU memory.
    If a step raises (or NaN appears), every layer already changed in this run is restored from
    its CPU copy (kept by ``backup``) before the error propagates.
    """
    path, layers = find_decoder_layers(model, decoder_path)
    for step in steps:  # work a step can start ahead, alongside the capture (compiling its kernels)
        prepare = getattr(step, "prepare", None)
        if prepare is not None:
            prepare(device)
    # The embeddings and whatever else runs before layer 0 compute on ``device`` too, so the captured
    # inputs do not depend on where the model sits.
    # Steps that match the float model's outputs also get, per layer, an untouched float copy of
    # the layer and its inputs from the float model (a second stream of hidden states).
    float_steps = [s for s in steps if getattr(s, "uses_float_inputs", False)] if propagate else []
    streams = 6 if float_steps else 3
    captured_on = offload if offload is not None else _capture_home(model, batches, device, streams)
    start = time.perf_counter()
    with tensors_moved(modules_outside(model, layers), device, weights_change=False, on_use=True), \
            record_function("quark.capture"):
        cache = capture_decoder_inputs(model, batches, layers, captured_on, device)
    logger.debug("%s: decoder inputs (kept on %s) captured in %.2fs", desc, captured_on, time.perf_counter() - start)
    if offload is None:
        offload = _activation_home(cache, device, streams)
        if torch.device(offload) != torch.device(captured_on):
            cache = _cache_on(cache, offload)
            if offload != "cpu":
                release_pinned_cache()  # the captured copies' staging memory (8B, 128 x 512 tokens: 0.5 GiB)
    own_backup = backup is None
    backup = backup if backup is not None else ModelBackup()
    # the hidden states travel in ``hidden`` from here on: layer 0's inputs are freed once it is done (as large
    # as the activations of one whole pass)
    hidden, cache = cache.without_hidden()
    hidden_float = list(hidden) if float_steps else []
    # Calibration batches run merged (batching.py) unless a step needs them as recorded; the first
    # layer checks that a merged call reproduces the batches it replaces.
    merge_ok: bool | None = None
    if float_steps or any(getattr(s, "keeps_calls_as_recorded", False) for s in steps):
        merge_ok = False
    if merge_ok is None:
        hidden = _rows_of_one_tensor(hidden)
    # layers in CPU memory cross to and from a GPU while it computes: the next layer is copied there while this
    # one is searched (one more layer on the device), a finished one goes home on a background thread
    mover = layer_mover(device)
    try:
        bar = tqdm(range(len(layers)), desc=desc, unit="layer", leave=False)
        for i in bar:
            layer = layers[i]
            name = f"{path}.{i}"
            start = time.perf_counter()
            retry = LayerRetry(name, steps, backup, desc)
            cpu_layer = _cpu_layer_for(layer, device)
            if cpu_layer:
                # onloaded() gives the layer new tensors on the device, so its CPU tensors stay as they are
                # until the backup's writer has saved them: no copy, and nothing crosses back from the device
                with record_function("quark.backup"):
                    backup.save(layer, copy=False)
            ready = mover.take(layer) if mover is not None else None
            while True:
                try:
                    with record_function("quark.layer"), onloaded(layer, device, weights_change=True, ready=ready,
                                                                  mover=mover):
                        ready = None
                        if mover is not None and i + 1 < len(layers):
                            mover.read_ahead(layers[i + 1])
                        hidden, hidden_float, merge_ok = _layer_pass(
                            layer, i, name, steps, cache, hidden, hidden_float, float_steps, device, offload,
                            merge_ok if not retry.unmerged else False, propagate, backup, desc, retry)
                    break
                except torch.OutOfMemoryError as error:
                    if mover is not None:  # the copies in flight go first, and no more are made
                        mover.wait()
                        mover.close()
                        mover = None
                    retry.after(error, layer, device)  # raises when nothing is left to try
                    if retry.activations_on_cpu and torch.device(offload).type != "cpu":
                        cache, offload = _cache_on(cache, "cpu"), "cpu"
                        hidden, hidden_float = move_to(hidden, "cpu", True), move_to(hidden_float, "cpu", True)
            if retry.unmerged and merge_ok:
                merge_ok = False  # the next layers run the calibration batches as given
            if cpu_layer and mover is None:  # the layer came back in new tensors; earlier layers' old ones are saved
                release_host_memory()  # and freed by now (the mover does this after each write-back)
            logger.debug("%s: layer %s done in %.2fs", desc, name, time.perf_counter() - start)
            if torch.cuda.is_available() and torch.device(device).type == "cuda":
                bar.set_postfix(peak_gib=f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}")
        if mover is not None:
            mover.wait()  # every layer home (a failed write-back raises here, and the model is restored)
    except BaseException:
        if mover is not None:
            mover.close()
        backup.restore()
        raise
    else:
        if own_backup:
            backup.discard()
    finally:
        if mover is not None:
            mover.close()
        if own_backup:
            backup.close()
        release_pinned_cache()
