"""Packing of sub-byte codes: int32 nibbles (reorder/order), uint8 nibbles, fp6 in 3 bytes."""

from __future__ import annotations

import pytest
import torch

from quark.torch.quantization.formats import (
    pack_fp6,
    pack_int32,
    pack_uint8_nibbles,
    unpack_fp6,
    unpack_int32,
    unpack_uint8_nibbles,
)

REORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _reference_pack_int32(codes: list[int], order: list[int]) -> list[int]:
    words = []
    for c in range(0, len(codes), 8):
        w = sum((codes[c + order[i]] & 0xF) << (4 * i) for i in range(8))
        words.append(w - (1 << 32) if w >= 1 << 31 else w)
    return words


def test_pack_int32_by_hand() -> None:
    codes = torch.arange(8, dtype=torch.uint8)
    assert pack_int32(codes).tolist() == [0x75316420]
    assert pack_int32(codes, order="order").tolist() == [0x76543210]
    assert pack_int32(torch.full((8,), -1, dtype=torch.int8)).tolist() == [-1]
    # Element 7 sits in the top nibble under both orders: 0x80000000 is -2^31 as int32.
    assert pack_int32(torch.tensor([0, 0, 0, 0, 0, 0, 0, 8])).tolist() == [-(2**31)]
    # Element 1 sits in nibble 4 under "reorder".
    assert pack_int32(torch.tensor([0, 5, 0, 0, 0, 0, 0, 0])).tolist() == [5 << 16]


@pytest.mark.parametrize("order", ["reorder", "order"])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_int32_matches_reference_and_round_trips(order: str, signed: bool) -> None:
    torch.manual_seed(9)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, (3, 32), dtype=torch.int8 if signed else torch.uint8)
    packed = pack_int32(codes, order=order)
    assert packed.dtype == torch.int32 and packed.shape == (3, 4)
    perm = REORDER if order == "reorder" else list(range(8))
    for r in range(3):
        assert packed[r].tolist() == _reference_pack_int32(codes[r].tolist(), perm)
    out = unpack_int32(packed, 32, signed=signed, order=order)
    assert out.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(out, codes)


@pytest.mark.parametrize("n", [1, 7, 13])
def test_pack_int32_partial_word(n: int) -> None:
    codes = torch.randint(-8, 8, (2, n), dtype=torch.int8)
    packed = pack_int32(codes)
    assert packed.shape == (2, (n + 7) // 8)
    assert torch.equal(unpack_int32(packed, n, signed=True), codes)


@pytest.mark.parametrize("bits", [2, 8])
def test_pack_int32_other_widths(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (4, 40), dtype=torch.uint8)
    packed = pack_int32(codes, bits=bits, order="order")
    assert packed.shape == (4, 40 * bits // 32 + (1 if 40 * bits % 32 else 0))
    assert torch.equal(unpack_int32(packed, 40, bits=bits, signed=False, order="order"), codes)


def test_pack_int32_errors() -> None:
    codes = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="reorder, order"):
        pack_int32(codes, order="zigzag")
    with pytest.raises(ValueError, match="bits=4 only"):
        pack_int32(codes, bits=8)
    with pytest.raises(ValueError, match="bits"):
        pack_int32(codes, bits=3, order="order")
    with pytest.raises(ValueError, match=r"ceil\(n / 8\)"):
        unpack_int32(pack_int32(codes), 17, signed=False)


def test_uint8_nibbles() -> None:
    assert pack_uint8_nibbles(torch.tensor([1, 2, 3], dtype=torch.uint8)).tolist() == [0x21, 0x03]
    torch.manual_seed(10)
    for n in (1, 2, 31, 64):
        codes = torch.randint(0, 16, (3, n), dtype=torch.uint8)
        packed = pack_uint8_nibbles(codes)
        assert packed.dtype == torch.uint8 and packed.shape == (3, (n + 1) // 2)
        assert torch.equal(unpack_uint8_nibbles(packed, n), codes)
    signed = torch.tensor([-8, -1, 0, 7, 3], dtype=torch.int8)
    assert torch.equal(unpack_uint8_nibbles(pack_uint8_nibbles(signed), 5, signed=True), signed)
    with pytest.raises(ValueError, match=r"ceil\(n / 2\)"):
        unpack_uint8_nibbles(torch.zeros(3, dtype=torch.uint8), 7)


def test_fp6() -> None:
    # word = 1 | 2 << 6 | 3 << 12 | 4 << 18 = 0x103081, little-endian bytes 81 30 10
    assert pack_fp6(torch.tensor([1, 2, 3, 4], dtype=torch.uint8)).tolist() == [0x81, 0x30, 0x10]
    torch.manual_seed(11)
    for n in (4, 7, 64):
        codes = torch.randint(0, 64, (2, n), dtype=torch.uint8)
        packed = pack_fp6(codes)
        assert packed.dtype == torch.uint8 and packed.shape == (2, (n + 3) // 4 * 3)
        assert torch.equal(unpack_fp6(packed, n), codes)
    with pytest.raises(ValueError, match="fit"):
        unpack_fp6(torch.zeros(4, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="fit"):
        unpack_fp6(torch.zeros(6, dtype=torch.uint8), 9)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_int32_every_width_matches_the_word_formula(bits: int, signed: bool) -> None:
    """Slot ``i`` of each int32 (bits ``bits*i`` up) holds code ``i`` (order="order"); every code of the width in
    every slot, odd lengths padded, against the word computed in Python integers."""
    per_word = 32 // bits
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    values = torch.arange(lo, hi).repeat(per_word)  # every code in every slot position over the words
    for n in (values.numel(), values.numel() - 3):
        codes = values[:n].to(torch.int8 if signed else torch.uint8).reshape(1, n)
        packed = pack_int32(codes, bits=bits, order="order")
        padded = codes[0].tolist() + [0] * (-n % per_word)
        expected = []
        for w in range(0, len(padded), per_word):
            word = sum((padded[w + i] & ((1 << bits) - 1)) << (bits * i) for i in range(per_word))
            expected.append(word - (1 << 32) if word >= 1 << 31 else word)
        assert packed[0].tolist() == expected
        assert torch.equal(unpack_int32(packed, n, bits=bits, signed=signed, order="order"), codes)
