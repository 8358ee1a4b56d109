"""Safetensors files written shard by shard into an atomically published folder, and read back
with clear errors (never pickle).

Writing: the exporter writes everything into the temporary folder of an
:class:`~quark.torch.export.output_folder.AtomicFolder` (defined there, re-exported here), which
is swapped with the destination at the end, so the destination always holds a complete output.
:func:`write_sharded` plans shards from tensor sizes alone, then serialises one shard at a time:
the extra memory is one shard's bytes, never a second copy of the model.

Reading: :func:`read_checkpoint` checks the index and every file header before touching data and
names the file and tensor in every error.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quark.torch.export.output_folder import AtomicFolder

logger = logging.getLogger(__name__)

SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_UNITS = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(value: int | str) -> int:
    """Bytes of ``value``: an int, or a string such as ``"5GB"``, ``"200MB"``, ``"10KiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().upper()
        for unit in sorted(_UNITS, key=len, reverse=True):
            if text.endswith(unit):
                number = text[: -len(unit)].strip()
                try:
                    return int(float(number) * _UNITS[unit])
                except ValueError:
                    break
        if text.isdigit() and int(text) > 0:
            return int(text)
    raise ValueError(f"max_shard_size={value!r} must be a positive int (bytes) or a string like '5GB', '200MB'")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group names (in order) into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_sharded(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
                  metadata: dict[str, str] | None = None) -> list[Path]:
    """Write ``(name, tensor)`` pairs as ``model.safetensors`` or shards plus an index.

    ``tensors`` must be re-iterable (a list of references into the model is fine: nothing is
    copied until a shard is serialised). Returns the files written.
    """
    items = list(tensors)
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate checkpoint tensor names: {dup}")
    max_bytes = parse_size(max_shard_size)
    shards = plan_shards([(n, _nbytes(t)) for n, t in items], max_bytes)
    lookup = dict(items)
    meta = {"format": "pt", **(metadata or {})}
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    total = sum(_nbytes(t) for t in lookup.values())
    for i, shard in enumerate(shards):
        fname = SAFE_NAME if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        part = {n: _standalone(lookup[n]) for n in shard}
        save_file(part, str(folder / fname), metadata=meta)
        del part
        files.append(folder / fname)
        weight_map.update({n: fname for n in shard})
        logger.debug("wrote %s (%d tensors)", fname, len(shard))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        files.append(folder / INDEX_NAME)
    return files


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A tensor safetensors accepts: contiguous, on CPU, not a view sharing storage with others."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != _nbytes(t):
        t = t.contiguous().clone()
    return t


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or does not match the model."""


def _check_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header without reading tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: corrupted safetensors header (header length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the safetensors header: {e}") from e
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info.get("data_offsets", (0, -1))
        if end > data_len or begin > end:
            raise CheckpointError(f"{path}: tensor {name!r} lies beyond the end of the file "
                                  f"(bytes {begin}..{end}, data is {data_len} bytes): the file is truncated")
    return header


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder (single file or the shards named by the index)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return files
    single = folder / SAFE_NAME
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(f"{folder}: no {SAFE_NAME}, {INDEX_NAME} or *.safetensors file (found: {found}); "
                          "only safetensors checkpoints are read (never pickle)")


def check_checkpoint(folder: str | Path) -> list[Path]:
    """The safetensors files of ``folder`` after checking every header (``CheckpointError`` names the
    file); no tensor data is read."""
    files = checkpoint_files(folder)
    for path in files:
        _check_header(path)
    return files


def iter_checkpoint(folder: str | Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield ``(name, tensor, file)`` for every tensor of the folder, one at a time."""
    files = check_checkpoint(folder)
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield name, f.get_tensor(name), path
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: cannot read tensors: {e}") from e


def read_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a folder and the file each came from."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for name, tensor, path in iter_checkpoint(folder):
        if name in tensors:
            raise CheckpointError(f"tensor {name!r} appears in both {origin[name]} and {path}")
        tensors[name] = tensor
        origin[name] = path
    return tensors, origin


__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "INDEX_NAME",
    "SAFE_NAME",
    "AtomicFolder",
    "CheckpointError",
    "check_checkpoint",
    "checkpoint_files",
    "iter_checkpoint",
    "parse_size",
    "plan_shards",
    "read_checkpoint",
    "write_sharded",
]
