"""Safetensors files written shard by shard into an atomically published folder, and read back
with clear errors (never pickle).

Writing: the exporter writes everything into the temporary folder of an
:class:`~quark.torch.export.output_folder.AtomicFolder` (defined there, re-exported here), which
is swapped with the destination at the end, so the destination always holds a complete output.
:func:`write_sharded` consumes the tensors in order and serialises each shard once it is full:
the extra memory is one shard's bytes, never a second copy of the model (the tensors may come
from a generator that reads a model on disk part by part).

Reading: :func:`read_checkpoint` checks the index and every file header before touching data and
names the file and tensor in every error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quark.torch.export.output_folder import AtomicFolder
from quark.torch.quantization.calibration.safetensors_header import CheckpointError, check_header, shown

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


class _ShardFill:
    """The one grouping rule of :func:`plan_shards` and :func:`write_sharded`: tensors in order, shards of
    at most ``max_bytes`` (a larger tensor gets its own)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used: int | None = None  # bytes in the current shard; None before the first tensor

    def starts_new(self, size: int) -> bool:
        """Whether the next tensor, of ``size`` bytes, starts a new shard (it is counted in either)."""
        starts = self.used is not None and self.used + size > self.max_bytes
        self.used = size if starts or self.used is None else self.used + size
        return starts


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group names (in order) into shards of at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    fill = _ShardFill(max_bytes)
    for name, size in sizes:
        if fill.starts_new(size):
            shards.append([])
        shards[-1].append(name)
    return shards


def write_sharded(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
                  metadata: dict[str, str] | None = None) -> list[Path]:
    """Write ``(name, tensor)`` pairs as ``model.safetensors`` or shards plus an index.

    ``tensors`` is consumed once, in order (a generator that reads a model part by part is fine):
    shards fill as :func:`plan_shards` would group the same sizes, each is written as soon as the
    next tensor would overflow it, so host memory holds one shard. Shards get their final names
    (``model-0000i-of-0000N``) once ``N`` is known. Returns the files written.
    """
    max_bytes = parse_size(max_shard_size)
    meta = {"format": "pt", **(metadata or {})}
    seen: set[str] = set()
    parts: list[Path] = []
    weight_map: dict[str, int] = {}
    shard: dict[str, torch.Tensor] = {}
    fill = _ShardFill(max_bytes)
    total = 0

    def flush() -> None:
        part = folder / f".shard-{len(parts):05d}.tmp"
        save_file(shard, str(part), metadata=meta)
        logger.debug("wrote shard %d (%d tensors)", len(parts) + 1, len(shard))
        parts.append(part)
        shard.clear()

    for name, tensor in tensors:
        if name in seen:
            raise ValueError(f"duplicate checkpoint tensor names: [{name!r}]")
        seen.add(name)
        size = _nbytes(tensor)
        if fill.starts_new(size):
            flush()
        shard[name] = _standalone(tensor)
        weight_map[name] = len(parts)
        total += size
    if shard or not parts:
        flush()
    if len(parts) == 1:
        files = [folder / SAFE_NAME]
    else:
        files = [folder / f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for part, final in zip(parts, files):
        part.replace(final)
    if len(parts) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: files[i].name for n, i in sorted(weight_map.items())}}
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
_MAX_PATH_CHARS = 1024


def file_inside(folder: str | Path, relative: object, what: str) -> Path:
    """``folder / relative`` after checking that it resolves (symlinks followed) inside ``folder``.

    Absolute paths, ``..`` steps and links that leave the folder are refused before anything is
    opened; ``what`` names where the path came from in the error.
    """
    root = Path(folder).resolve()
    if not isinstance(relative, str) or not relative or "\x00" in relative or len(relative) > _MAX_PATH_CHARS:
        raise CheckpointError(f"{what}: file name {shown(relative)} is not a relative file name (at most "
                              f"{_MAX_PATH_CHARS} characters, no NUL)")
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise CheckpointError(f"{what}: file {shown(relative)} is not inside the model folder {root} "
                              "(absolute paths and '..' are refused)")
    path = root / relative
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (older Pythons)
        raise CheckpointError(f"{what}: cannot resolve {shown(relative)} ({type(e).__name__})") from None
    if not resolved.is_relative_to(root):
        raise CheckpointError(f"{what}: {shown(relative)} is a link to a file outside the model folder {root}; "
                              "refused (copy the files into the folder instead of linking them)")
    return path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system, permissions
        return False


def _index_shards(folder: Path, index: Path) -> list[Path]:
    """The shard files an index names, each checked to lie inside ``folder``."""
    try:
        data = json.loads(index.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read the index ({type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index}: not a valid safetensors index (invalid JSON: {e.msg} at byte "
                              f"{e.pos})") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index (invalid JSON: {type(e).__name__})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: not a valid safetensors index: field 'weight_map' must be a non-empty "
                              "object mapping tensor names to shard file names")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: weight_map[{shown(name)}] must be a shard file name (a string)")
    files = [file_inside(folder, shard, f"{index} weight_map") for shard in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not _is_file(f)]
    if missing:
        raise CheckpointError(f"{index} names shard files that do not exist: {[shown(m) for m in missing[:8]]}")
    return files


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder (single file or the shards named by the index).

    Every file must lie inside ``folder`` (links out of it are refused).
    """
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        return _index_shards(folder, file_inside(folder, INDEX_NAME, str(folder)))
    single = folder / SAFE_NAME
    if single.is_file():
        return [file_inside(folder, SAFE_NAME, str(folder))]
    others = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if others:
        return [file_inside(folder, p.name, str(folder)) for p in others]
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(f"{folder}: no {SAFE_NAME}, {INDEX_NAME} or *.safetensors file (found: {found[:20]}); "
                          "only safetensors checkpoints are read (never pickle)")


def check_checkpoint(folder: str | Path) -> list[Path]:
    """The safetensors files of ``folder`` after checking every header (``CheckpointError`` names the
    file); no tensor data is read."""
    files = checkpoint_files(folder)
    for path in files:
        check_header(path)
    return files


def _count_nonfinite(tensor: torch.Tensor) -> int:
    """NaN/Inf entries of a floating tensor (fp8/e8m0 codes checked on their bits: no isfinite there)."""
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
        bits = tensor.view(torch.uint8)
        if tensor.dtype == torch.float8_e4m3fn:
            return int(((bits & 0x7F) == 0x7F).sum())
        return int((bits == 0x80).sum())  # the fnuz formats' one NaN
    if tensor.dtype == torch.float8_e5m2:
        return int(((tensor.view(torch.uint8) & 0x7C) == 0x7C).sum())
    if tensor.dtype == getattr(torch, "float8_e8m0fnu", None):
        return int((tensor.view(torch.uint8) == 0xFF).sum())
    if tensor.is_floating_point() or tensor.is_complex():
        return int((~torch.isfinite(tensor)).sum())
    return 0


def check_finite(tensor: torch.Tensor, name: str, path: Path | str) -> None:
    """Refuse a tensor with NaN or Inf entries, naming it and its file."""
    bad = _count_nonfinite(tensor)
    if bad:
        raise CheckpointError(f"{path}: tensor {shown(name)} has {bad} NaN/Inf value(s); checkpoint weights, "
                              "scales and zero points must be finite")


def iter_checkpoint(folder: str | Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield ``(name, tensor, file)`` for every tensor of the folder, one at a time.

    Headers are all checked before any data is read; every tensor is checked to be finite.
    """
    files = check_checkpoint(folder)
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    tensor = f.get_tensor(name)
                    check_finite(tensor, name, path)
                    yield name, tensor, path
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types
            # the library's message may quote the file; the chained exception keeps it for debugging
            raise CheckpointError(f"{path}: cannot read tensors ({type(e).__name__})") from e


def read_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a folder and the file each came from."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for name, tensor, path in iter_checkpoint(folder):
        if name in tensors:
            raise CheckpointError(f"tensor {shown(name)} appears in both {origin[name]} and {path}")
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
    "check_finite",
    "checkpoint_files",
    "file_inside",
    "iter_checkpoint",
    "parse_size",
    "plan_shards",
    "read_checkpoint",
    "shown",
    "write_sharded",
]
