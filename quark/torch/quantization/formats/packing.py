"""Bit packing of sub-byte codes into real storage tensors.

Layouts (the Quark Hugging Face checkpoint format, see ``reference/quark-hf-format.md``):

- ``pack_int32``: ``32 / bits`` codes per int32 along the last dim. Under ``order="reorder"``
  (4-bit only), nibble ``i`` (bits ``4i..4i+3``) of packed int32 ``c`` holds logical element
  ``8c + [0, 2, 4, 6, 1, 3, 5, 7][i]``; ``order="order"`` is the identity (slot ``i`` holds
  element ``8c + i``). Signed codes are stored two's complement in their slot.
- ``pack_uint8_nibbles``: two 4-bit codes per byte, the even element in the low nibble (MXFP4).
- ``pack_fp6``: four 6-bit codes in three bytes; code ``j`` occupies bits ``6j..6j+5`` of the
  little-endian 24-bit word (MXFP6).

Every packer accepts any length: a last partial word is padded with zero codes, and the matching
unpacker takes the logical length ``n`` to drop them again (``ValueError`` when ``n`` does not
fit the packed size).
"""

from __future__ import annotations

import math
import sys

import torch

__all__ = ["PACK_ORDERS", "pack_fp6", "pack_int32", "pack_uint8_nibbles", "unpack_fp6",
           "unpack_int32", "unpack_uint8_nibbles"]

PACK_ORDERS = ("reorder", "order")
_REORDER_4BIT = (0, 2, 4, 6, 1, 3, 5, 7)
#: The byte of an int32 in memory that holds its bits 0-7, 8-15, 16-23, 24-31 (the packers view four bytes
#: as one int32, so they follow the machine's byte order).
_BYTES_LOW_FIRST = (0, 1, 2, 3) if sys.byteorder == "little" else (3, 2, 1, 0)


def _pad_last(codes: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-codes.shape[-1]) % multiple
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad), value=0)
    return codes


def _check_n(owner: str, n: int, packed_len: int, per_word: int, bytes_per_word: int = 1) -> None:
    words = packed_len // bytes_per_word
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or math.ceil(n / per_word) != words \
            or packed_len % bytes_per_word:
        raise ValueError(f"{owner}: n={n!r} does not fit a packed last dim of {packed_len}; n must "
                         f"satisfy ceil(n / {per_word}) * {bytes_per_word} == {packed_len}")


def _slot_order(bits: int, order: str, owner: str) -> tuple[int, ...]:
    if bits not in (2, 4, 8):
        raise ValueError(f"{owner}.bits={bits!r} is not one of: 2, 4, 8")
    if order not in PACK_ORDERS:
        raise ValueError(f"{owner}.order={order!r} is not one of: {', '.join(PACK_ORDERS)}")
    per_word = 32 // bits
    if order == "reorder":
        if bits != 4:
            raise ValueError(f"{owner}: order='reorder' is defined for bits=4 only; use order='order'")
        return _REORDER_4BIT
    return tuple(range(per_word))


def pack_int32(codes: torch.Tensor, *, bits: int = 4, order: str = "reorder") -> torch.Tensor:
    """Pack integer codes (signed or unsigned, ``bits`` wide) into int32 along the last dim.

    Output shape ``[..., ceil(n / (32 / bits))]``; a partial last word is padded with zero codes.
    Each word is assembled from its four bytes (``8 / bits`` codes each, in one-byte arithmetic) and the bytes
    are viewed as the int32: no int64 copy of the codes (an 8B model's decoder layer has 218M of them).
    """
    owner = "formats.pack_int32"
    slots = _slot_order(bits, order, owner)
    per_word, per_byte = len(slots), 8 // bits
    # the low ``bits`` of each code: a signed code's two's complement slot (one-byte codes are read as their bytes,
    # which hold that two's complement: no wider copy)
    padded = _pad_last(codes, per_word)
    if padded.dtype in (torch.int8, torch.uint8):
        c = padded.view(torch.uint8) & ((1 << bits) - 1)
    else:
        c = (padded.to(torch.int16) & ((1 << bits) - 1)).to(torch.uint8)
    c = c.reshape(*c.shape[:-1], -1, per_word)
    parts = []
    for k in _BYTES_LOW_FIRST:
        byte = c[..., slots[k * per_byte]]
        for j in range(1, per_byte):
            byte = byte | (c[..., slots[k * per_byte + j]] << (bits * j))
        parts.append(byte)
    return torch.stack(parts, -1).view(torch.int32).squeeze(-1)


def unpack_int32(packed: torch.Tensor, n: int, *, bits: int = 4, signed: bool,
                 order: str = "reorder") -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``int8`` (``signed``) or ``uint8`` codes ``[..., n]``."""
    owner = "formats.unpack_int32"
    slots = _slot_order(bits, order, owner)
    per_word, per_byte = len(slots), 8 // bits
    _check_n(owner, n, packed.shape[-1], per_word)
    raw = packed.to(torch.int32).contiguous().view(torch.uint8).reshape(*packed.shape, 4)
    mask = (1 << bits) - 1
    out = torch.empty(*packed.shape, per_word, dtype=torch.uint8, device=packed.device)
    for k, position in enumerate(_BYTES_LOW_FIRST):
        byte = raw[..., position]
        for j in range(per_byte):
            out[..., slots[k * per_byte + j]] = (byte >> (bits * j)) & mask
    out = out.reshape(*packed.shape[:-1], -1)[..., :n]
    if not signed:
        return out
    wide = out.to(torch.int16)
    return torch.where(wide >= 1 << (bits - 1), wide - (1 << bits), wide).to(torch.int8)


def pack_uint8_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per ``uint8`` (even element low nibble); ``[..., ceil(n / 2)]``."""
    c = _pad_last(codes.to(torch.int16), 2) & 0xF
    c = c.reshape(*c.shape[:-1], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).to(torch.uint8)


def unpack_uint8_nibbles(packed: torch.Tensor, n: int, *, signed: bool = False) -> torch.Tensor:
    """Inverse of :func:`pack_uint8_nibbles`: ``uint8`` nibbles ``[..., n]`` (``int8`` if ``signed``)."""
    _check_n("formats.unpack_uint8_nibbles", n, packed.shape[-1], 2)
    p = packed.to(torch.int16)
    out = torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]
    if signed:
        return torch.where(out >= 8, out - 16, out).to(torch.int8)
    return out.to(torch.uint8)


def pack_fp6(codes: torch.Tensor) -> torch.Tensor:
    """Four 6-bit codes per three bytes (little-endian bit order); ``[..., ceil(n / 4) * 3]``."""
    c = _pad_last(codes.to(torch.int32), 4) & 0x3F
    c = c.reshape(*c.shape[:-1], -1, 4)
    word = c[..., 0] | (c[..., 1] << 6) | (c[..., 2] << 12) | (c[..., 3] << 18)
    out = torch.stack((word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF), dim=-1)
    return out.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack_fp6(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_fp6`: ``uint8`` 6-bit codes ``[..., n]``."""
    _check_n("formats.unpack_fp6", n, packed.shape[-1], 4, bytes_per_word=3)
    b = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    out = torch.stack([(word >> (6 * j)) & 0x3F for j in range(4)], dim=-1)
    return out.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)
