"""Safetensors file headers, parsed and checked before any tensor data is read; and a writer that streams
(layer 6, files only).

Both readers of checkpoint files use this one parser: the exporter's checkpoint reader
(``quark.torch.export.safetensors_io``) and the disk placement's weight source
(:mod:`~quark.torch.quantization.calibration.weight_source`). A header is JSON only, never executed;
every field is checked against the file's size, and names read from a file are shortened in errors.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from quark.torch.quantization.calibration import transfer

__all__ = ["TORCH_DTYPES", "CheckpointError", "check_header", "read_header", "save_streamed", "shown"]

#: safetensors dtype names -> torch dtypes, for the dtypes a tensor can be read as
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu}

class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or does not match the model."""


_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
               "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
               "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_SUB_BYTE_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")  # packed below one byte: no per-element size check
_MAX_HEADER_BYTES = 100 * 1024**2  # the safetensors library's own limit
_MAX_NAME_CHARS = 200  # names from files are echoed in errors at most this long


def shown(value: object) -> str:
    """``repr`` of a name read from a file, shortened for an error message."""
    text = repr(value)
    return text if len(text) <= _MAX_NAME_CHARS else text[:_MAX_NAME_CHARS] + "...'"


def _header_entry(path: Path, name: object, info: object, data_len: int) -> None:
    """Check one tensor entry of a safetensors header: dtype, shape and offsets agree with the file."""
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: corrupted safetensors header (a tensor name is not a string)")
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {shown(name)}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or (dtype not in _ITEM_BYTES and dtype not in _SUB_BYTE_DTYPES):
        raise CheckpointError(f"{path}: tensor {shown(name)}: header field 'dtype'={shown(dtype)} is not one of: "
                              f"{', '.join([*_ITEM_BYTES, *_SUB_BYTE_DTYPES])}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {shown(name)}: header field 'shape' must be a list of "
                              "non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"{path}: tensor {shown(name)}: header field 'data_offsets' must be two integers")
    begin, end = offsets
    if begin < 0 or begin > end:
        raise CheckpointError(f"{path}: tensor {shown(name)}: header field 'data_offsets' [{begin}, {end}] "
                              "is not a byte range")
    if end > data_len:
        raise CheckpointError(f"{path}: tensor {shown(name)} lies beyond the end of the file "
                              f"(bytes {begin}..{end}, data is {data_len} bytes): the file is truncated")
    numel = 1
    for d in shape:
        numel *= d  # Python ints: a 400-digit dimension cannot overflow here
    item = _ITEM_BYTES.get(dtype)
    if item is not None and numel * item != end - begin:
        raise CheckpointError(f"{path}: tensor {shown(name)}: shape {shape if numel < 2**64 else '(huge)'} of "
                              f"{dtype} needs {numel * item if numel < 2**64 else 'more than 2**64'} bytes, "
                              f"the header gives {end - begin}")


def read_header(path: Path) -> tuple[int, dict[str, dict]]:
    """``(offset of the tensor data, header)`` of a safetensors file, parsed and validated without reading
    tensor data (the header keeps its ``__metadata__``)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or 8 + n > size or n > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: corrupted safetensors header (header length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the safetensors header ({type(e).__name__})") from None
    except json.JSONDecodeError as e:  # its message gives a position, never the file's content
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e.msg} at byte {e.pos})") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8, integers too long for Python, nesting too deep
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: header field '__metadata__' must map names to strings")
    data_len = size - 8 - n
    for name, info in header.items():
        if name != "__metadata__":
            _header_entry(path, name, info, data_len)
    return 8 + n, header


def check_header(path: Path) -> dict[str, dict]:
    """The validated header of a safetensors file (see :func:`read_header`)."""
    return read_header(path)[1]


def save_streamed(tensors: dict[str, torch.Tensor], path: str | os.PathLike, to_host: Any = None) -> None:
    """Write ``tensors`` as one safetensors file, one tensor in host memory at a time.

    ``safetensors.torch.save_file`` takes every tensor in host memory at once; here each is brought to
    the host (``to_host``, default ``Tensor.cpu``; a CUDA tensor by default through two page-locked buffers of
    ``transfer.STAGE_BYTES``, :func:`~.transfer.host_pieces`) only while its bytes are written, so writing a
    decoder layer that sits on a GPU holds at most one of its tensors in host memory, not all of them. Same format
    (``__metadata__`` ``{"format": "pt"}``, little-endian, header padded to 8 bytes), readable by
    ``safetensors.safe_open`` and :func:`read_header`.
    """
    names = {dtype: name for name, dtype in TORCH_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"save_streamed: tensor {key} has dtype {t.dtype}, which safetensors does not store")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    move = to_host or (lambda t: t.cpu())
    partial = Path(f"{os.fspath(path)}.partial")  # renamed once complete: a failed write leaves no file
    try:
        with open(partial, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for t in tensors.values():
                if to_host is None and t.is_cuda and transfer.USE_PINNED:  # through two small page-locked buffers
                    for _, piece in transfer.host_pieces(t):
                        f.write(memoryview(piece.numpy()))
                    continue
                host = move(t.detach()).contiguous()
                if host.numel():
                    f.write(memoryview(host.reshape(-1).view(torch.uint8).numpy()))
                del host
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
