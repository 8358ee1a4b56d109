"""Weights of a model built on the meta device, read when a stage needs them (layer 6).

The disk placement builds the model on the meta device (no memory for weights) and attaches a
:class:`DiskWeights`: each parameter is read from the checkpoint's safetensors shards when the unit
holding it (a decoder layer, an embedding, ``lm_head``) is moved to the compute device
(``placement.onloaded`` / ``tensors_moved``), and goes back to the meta device afterwards. A unit a
stage changed (algorithms change weights, ``freeze`` packs them) is written to the offload folder,
one safetensors file per write, and later reads prefer that copy. Host memory therefore holds about
one unit's weights, plus the buffers (quantizer scales, rotations), which stay in CPU memory.

Reading is overlapped with the work: when decoder layer ``N`` is loaded, layer ``N + 1`` is read in a
background thread (one unit ahead, so host memory holds at most one more layer); its tensors are used
when it is loaded, unless its source changed meanwhile. ``QUARK_DISK_READ_AHEAD=0`` turns this off.

Parameters are swapped in and out with ``torch.utils.swap_tensors``, so a Parameter keeps its
identity: weights tied between modules (embeddings and ``lm_head``) stay tied, and a ``QuantLinear``
sharing its Parameters with the ``nn.Linear`` it replaced sees the same data.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import itertools
import logging
import os
import re
import sys
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from quark.torch.quantization.calibration.safetensors_header import TORCH_DTYPES, read_header, save_streamed
from quark.torch.quantization.calibration.transfer import transfer

logger = logging.getLogger(__name__)

__all__ = ["DiskWeights", "disk_weights", "has_meta_parameters", "release_host_memory", "source_of"]

_SOURCES: weakref.WeakKeyDictionary[nn.Module, DiskWeights] = weakref.WeakKeyDictionary()
_NUMBERED = re.compile(r"^(.*)\.(\d+)$")


def read_ahead_enabled() -> bool:
    """Whether the next decoder layer is read in the background (``QUARK_DISK_READ_AHEAD``, default on)."""
    return os.environ.get("QUARK_DISK_READ_AHEAD", "1") != "0"


def has_meta_parameters(module: nn.Module) -> bool:
    """Whether some parameter of ``module`` is on the meta device (not loaded)."""
    return any(p.device.type == "meta" for p in module.parameters())


def disk_weights(model: nn.Module) -> DiskWeights | None:
    """The :class:`DiskWeights` attached to the root ``model``, if any."""
    return _SOURCES.get(model)


def source_of(module: nn.Module) -> tuple[DiskWeights, str] | None:
    """``(weights, qualified name of module)`` when ``module`` belongs to a model with :class:`DiskWeights`."""
    for root, source in list(_SOURCES.items()):
        name = source.name_of(module, root)
        if name is not None:
            return source, name
    return None


class DiskWeights:
    """Where the parameters of a meta-device model come from: the offload folder, else the checkpoint.

    :param files: the checkpoint's safetensors files (checked by the caller).
    :param offload_folder: where changed units are written (created if missing; the caller owns it).
    :param checkpoint_names: the checkpoint key of each model parameter whose name differs from it (checkpoints
        whose tensors the loading library renames), else looked up by the parameter's own name.
    """

    def __init__(self, files: Sequence[str | Path], offload_folder: str | Path,
                 checkpoint_names: dict[str, str] | None = None) -> None:
        self.renamed = dict(checkpoint_names or {})
        self.checkpoint: dict[str, Path] = {}
        self._headers: dict[Path, tuple[int, dict[str, dict]]] = {}
        for path in files:
            for key in self._header(Path(path))[1]:
                self.checkpoint.setdefault(key, Path(path))
        self.folder = Path(offload_folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.offloaded: dict[str, tuple[Path, str]] = {}  # name -> (file, key in that file)
        self.aliases: dict[str, list[str]] = {}
        self._tied: set[int] = set()
        self._names: dict[int, str] = {}
        self._root: weakref.ref[nn.Module] | None = None
        self._counter = itertools.count()
        self._pins = 0
        self._stale: set[Path] = set()
        self.bytes_read = 0
        self.bytes_written = 0
        # Read ahead: the unit being read in the background, and each parameter's source and pending read.
        self._ahead_unit: str | None = None
        self._ahead: dict[str, tuple[tuple[Path, str], Future[torch.Tensor]]] = {}
        self._reader: ThreadPoolExecutor | None = None

    # -- attaching -------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Attach to the root ``model``; ``ValueError`` naming the parameters the checkpoint lacks."""
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        missing = []
        for names in groups.values():
            for name in names:
                self.aliases[name] = [n for n in names if n != name]
            if len(names) > 1:
                self._tied.update(id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in names)
            if not any(self._checkpoint_key(n) is not None for n in names):
                missing.append(names[0])
        if missing:
            raise ValueError(f"the checkpoint has no tensor for {len(missing)} parameter(s) of "
                             f"{type(model).__name__} (e.g. {missing[:4]}): its keys do not follow the model's "
                             "names, so the disk placement cannot read the layers from it; use --offload cpu "
                             "(transformers loads and converts the checkpoint)")
        self._root = weakref.ref(model)
        _SOURCES[model] = self

    def name_of(self, module: nn.Module, root: nn.Module) -> str | None:
        name = self._names.get(id(module))
        if name is not None and _get(root, name) is module:
            return name
        self._names = {id(m): n for n, m in root.named_modules(remove_duplicate=False)}
        return self._names.get(id(module))

    # -- reading ---------------------------------------------------------------------------------
    def _checkpoint_key(self, name: str) -> str | None:
        for key in (name, *self.aliases.get(name, ())):
            if key in self.checkpoint:
                return key
            if self.renamed.get(key) in self.checkpoint:
                return self.renamed[key]
        return None

    def _source(self, name: str) -> tuple[Path, str]:
        """``(file, key)`` holding the current value of parameter ``name``."""
        if name in self.offloaded:
            return self.offloaded[name]
        found = self._checkpoint_key(name)
        if found is None:
            raise KeyError(f"{name}: neither offloaded nor in the checkpoint")
        return self.checkpoint[found], found

    def read(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The current value of parameter ``name``: its offloaded copy, else the checkpoint's tensor."""
        source = self._source(name)
        read_from, pending = self._ahead.pop(name, (None, None))
        if pending is not None and read_from == source:
            tensor = pending.result()
        else:  # not read ahead, or written again since
            if pending is not None:
                _settle(pending)
            tensor = self._read_file(*source)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return transfer(tensor, device)

    def read_ahead(self, prefix: str) -> None:
        """Start reading the not-loaded parameters of the module named ``prefix`` in the background (the
        unit read ahead before is forgotten unless it is this one)."""
        if prefix == self._ahead_unit:
            return
        self.forget_read_ahead()
        root = self._root() if self._root is not None else None
        module = _get(root, prefix) if root is not None else None
        if module is None:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quark-read-ahead")
        self._ahead_unit = prefix
        for name, p in module.named_parameters(prefix=prefix):
            if p.device.type == "meta":
                with contextlib.suppress(KeyError):  # the read when it is loaded names what is missing
                    source = self._source(name)
                    self._ahead[name] = (source, self._reader.submit(self._read_file, *source))

    def forget_read_ahead(self) -> None:
        """Drop what was read ahead and not used (waiting for reads already running)."""
        pending, self._ahead, self._ahead_unit = self._ahead, {}, None
        for _, future in pending.values():
            _settle(future)

    def _next_unit(self, prefix: str) -> str | None:
        """The name of the module after ``prefix`` in its numbered list (``layers.4`` -> ``layers.5``)."""
        match = _NUMBERED.match(prefix)
        root = self._root() if self._root is not None else None
        if match is None or root is None:
            return None
        following = f"{match.group(1)}.{int(match.group(2)) + 1}"
        return following if _get(root, following) is not None else None

    def _header(self, path: Path) -> tuple[int, dict[str, dict]]:
        """``(offset of the data, {name: header entry})`` of a safetensors file, checked (cached)."""
        if path not in self._headers:
            start, header = read_header(path)
            header.pop("__metadata__", None)
            self._headers[path] = (start, header)
        return self._headers[path]

    def _read_file(self, path: Path, key: str) -> torch.Tensor:
        # Plain reads into a fresh buffer rather than safetensors' memory map: pages of a mapped file
        # count in the process's resident memory, and whole files were seen mapped at once.
        start, header = self._header(path)
        entry = header[key]
        begin, end = entry["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(start + begin)
            view, done = memoryview(buffer.numpy()), 0
            while done < end - begin:
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"{path}: tensor {key} is truncated")
                done += got
        dtype = TORCH_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {key} has dtype {entry['dtype']}, which the disk placement does not "
                             f"read; known: {', '.join(TORCH_DTYPES)}")
        return buffer.view(dtype).reshape(entry["shape"])

    # -- writing ---------------------------------------------------------------------------------
    def write(self, tensors: dict[str, torch.Tensor], aliases: dict[str, list[str]] | None = None) -> None:
        """Write ``tensors`` (qualified names) as one new offload file; later reads of these names (and of
        their ``aliases``, other names of a tied tensor) prefer it."""
        if not tensors:
            return
        path = self.folder / f"{next(self._counter):06d}.safetensors"
        # one tensor at a time in host memory (a 70B decoder layer is 1.7 GiB)
        save_streamed(tensors, path)  # a tensor on a GPU crosses through two small page-locked buffers
        self._headers.pop(path, None)
        self.bytes_written += sum(t.numel() * t.element_size() for t in tensors.values())
        names = {k: [k, *(aliases or {}).get(k, [])] for k in tensors}
        self._stale |= {self.offloaded[n][0] for group in names.values() for n in group if n in self.offloaded}
        for key, group in names.items():
            for name in group:
                self.offloaded[name] = (path, key)
        self._collect()

    def _collect(self) -> None:
        if self._pins:
            return
        live = {path for path, _ in self.offloaded.values()}
        for path in self._stale - live:
            path.unlink(missing_ok=True)
        self._stale &= live

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Within the block no offload file is deleted, so :meth:`snapshot` states can be restored."""
        self._pins += 1
        try:
            yield
        finally:
            self._pins -= 1
            self._collect()

    def snapshot(self) -> dict[str, tuple[Path, str]]:
        return dict(self.offloaded)

    def restore(self, state: dict[str, tuple[Path, str]]) -> None:
        self._stale |= {path for path, _ in self.offloaded.values()}
        self.offloaded = dict(state)
        self._collect()

    # -- loading modules -------------------------------------------------------------------------
    def _all_names(self, param: nn.Parameter) -> list[str]:
        root = self._root() if self._root is not None else None
        if root is None:
            return []
        return [n for n, p in root.named_parameters(remove_duplicate=False) if p is param]

    @contextlib.contextmanager
    def loaded(self, modules: Sequence[nn.Module], device: torch.device | str, *, recurse: bool,
               weights_change: bool) -> Iterator[None]:
        """Parameters of ``modules`` (their own, or with ``recurse`` all of them) read onto ``device``,
        buffers moved there; afterwards the parameters go back to the meta device (written to the
        offload folder first with ``weights_change``, or when they were not read here) and the
        buffers back where they were (new buffers to the CPU).

        Modules are identified by their names in the model: a module the block replaced (a Linear
        swapped for a QuantLinear) is put back through its replacement.
        """
        device = torch.device(device)
        root = self._root() if self._root is not None else None
        if root is None:
            raise RuntimeError("the model these weights belong to no longer exists")
        prefixes = []
        for module in modules:
            prefix = self.name_of(module, root)
            if prefix is None:
                raise RuntimeError(f"{type(module).__name__} is not part of the model these weights belong to")
            prefixes.append(prefix)
        loaded: set[int] = set()
        moved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        homes: dict[tuple[int, str], torch.device] = {}
        seen: set[int] = set()
        try:
            for module, prefix in zip(modules, prefixes):
                for name, p in module.named_parameters(prefix=prefix, recurse=recurse):
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                    if p.device.type == "meta":
                        tensor = self.read(name, device)
                        if tuple(tensor.shape) != tuple(p.shape):
                            raise ValueError(f"{name}: the checkpoint holds shape {tuple(tensor.shape)}, the "
                                             f"model expects {tuple(p.shape)}")
                        torch.utils.swap_tensors(p, nn.Parameter(tensor.to(p.dtype),
                                                                 requires_grad=p.requires_grad))
                        loaded.add(id(p))
                    elif p.device != device:
                        moved[id(p)] = (p, p.data)
                        p.data = transfer(p.data, device)
                for sub in (module.modules() if recurse else [module]):
                    for bname, buf in sub._buffers.items():
                        if buf is not None and buf.device != device:
                            homes[(id(sub), bname)] = buf.device
                            sub._buffers[bname] = transfer(buf, device)
            if self._ahead_unit in prefixes:  # used up (what it did not need is dropped)
                self.forget_read_ahead()
            if recurse and read_ahead_enabled():
                following = self._next_unit(prefixes[-1])
                if following is not None:
                    self.read_ahead(following)
            yield
        finally:
            current = [_get(root, prefix) for prefix in prefixes]
            self._put_back([(m, p) for m, p in zip(current, prefixes) if m is not None], loaded, moved, homes,
                           recurse, weights_change)

    def _put_back(self, units: list[tuple[nn.Module, str]], loaded: set[int],
                  moved: dict[int, tuple[nn.Parameter, torch.Tensor]], homes: dict[tuple[int, str], torch.device],
                  recurse: bool, weights_change: bool) -> None:
        params: dict[int, tuple[str, nn.Parameter]] = {}
        for module, prefix in units:
            for name, p in module.named_parameters(prefix=prefix, recurse=recurse):
                params.setdefault(id(p), (name, p))
        write: dict[str, torch.Tensor] = {}
        aliases: dict[str, list[str]] = {}
        for pid, (name, p) in params.items():
            if p.device.type == "meta" or pid in moved:
                continue
            if weights_change or pid not in loaded:
                write[name] = p.detach()
                if pid in self._tied:
                    aliases[name] = [n for n in self._all_names(p) if n != name]
        self.write(write, aliases)
        for pid, (_, p) in params.items():
            if pid not in moved and p.device.type != "meta":
                torch.utils.swap_tensors(p, nn.Parameter(torch.empty_like(p, device="meta"),
                                                         requires_grad=p.requires_grad))
        for p, data in moved.values():
            p.data = data
        release_host_memory()
        for module, _ in units:
            for sub in (module.modules() if recurse else [module]):
                for bname, buf in sub._buffers.items():
                    if buf is not None:
                        home = homes.get((id(sub), bname), torch.device("cpu"))
                        if buf.device != home:
                            sub._buffers[bname] = transfer(buf, home)


def _settle(future: Future) -> None:
    """Cancel a background read, or wait for it when it already runs (its error, if any, is dropped: the
    tensor is read again when needed, and that read reports it)."""
    if not future.cancel():
        with contextlib.suppress(Exception):
            future.result()


@functools.cache
def _malloc_trim() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_host_memory() -> None:
    """Give the memory of freed tensors back to the OS. glibc keeps freed blocks below its (adaptive,
    up to 32 MiB) mmap threshold in the heap, so without this a process reading one layer after the
    other grows by most of each layer (measured: 644 MiB before, 358 MiB after, for a 360 MiB model)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _get(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name) if name else root
    except AttributeError:
        return None
