"""BFP16, MX6 and MX9: hand examples, an independent per-block reference, storage round trips."""

from __future__ import annotations

import math

import pytest
import torch

from quark.torch.quantization.config.type import Dtype
from quark.torch.quantization.formats import (
    FORMATS,
    BfpTensor,
    bfp_dequantize,
    bfp_fake_quantize,
    bfp_quantize,
)

BFP = [Dtype.bfp16, Dtype.mx6, Dtype.mx9]


def test_bfp16_hand_example() -> None:
    x = torch.tensor([1.0, 0.5, -0.25, 2.0**-7, 0.01, 0.0, 0.0, 0.0])
    # amax 1 -> E = 0, quantum 2^(0 - 6); 2^-7 / 2^-6 = .5 -> 0 (even); .01 * 64 = .64 -> 1
    st = bfp_quantize(x, Dtype.bfp16)
    assert st.shared_exp.tolist() == [127] and st.micro_exp is None
    assert st.mantissa.tolist() == [64, 32, -16, 0, 1, 0, 0, 0]
    out = bfp_dequantize(st, Dtype.bfp16)
    assert out.tolist() == [1.0, 0.5, -0.25, 0.0, 1 / 64, 0.0, 0.0, 0.0]
    assert torch.equal(bfp_fake_quantize(x, Dtype.bfp16), out)


def test_bfp16_rounding_overflow_bumps_exponent() -> None:
    x = torch.tensor([1.999, 0.01, 0, 0, 0, 0, 0, 0])
    # 1.999 * 64 = 127.94 -> 128 does not fit 7 bits: E becomes 1, quantum 2^-5.
    st = bfp_quantize(x, Dtype.bfp16)
    assert st.shared_exp.tolist() == [128]
    assert st.mantissa.tolist()[:2] == [64, 0]
    assert bfp_fake_quantize(x, Dtype.bfp16)[:2].tolist() == [2.0, 0.0]


@pytest.mark.parametrize("dtype, mantissas", [
    (Dtype.mx9, [96, 6, 38, -26, 127, 0]),
    (Dtype.mx6, [12, 1, 5, -3, 15, 0]),
])
def test_mx9_mx6_hand_example(dtype: Dtype, mantissas: list[int]) -> None:
    x = torch.zeros(16)
    x[:6] = torch.tensor([1.5, 0.1, 0.3, -0.2, 0.999, 0.0])
    # E = floor(log2 1.5) = 0. Pair 0 holds 1.5 >= 2^0: mu = 0, quantum 2^(0 - (m-1)).
    # Pairs 1.. are below 2^0: mu = 1, quantum halves. MX9 (m=7): .3*128 = 38.4 -> 38,
    # -.2*128 = -25.6 -> -26, .999*128 = 127.9 -> 128 saturates to 127. MX6 (m=4): .1*8 = .8 -> 1,
    # .3*16 = 4.8 -> 5, -.2*16 = -3.2 -> -3, .999*16 = 15.98 -> 16 saturates to 15.
    st = bfp_quantize(x, dtype)
    m = FORMATS[dtype].mbits
    assert st.shared_exp.tolist() == [127]
    assert st.micro_exp is not None and st.micro_exp.tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
    assert st.mantissa[:6].tolist() == mantissas
    quanta = [2.0 ** -(m - 1)] * 2 + [2.0**-m] * 4
    expected = torch.tensor([q * v for q, v in zip(quanta, mantissas)])
    out = bfp_dequantize(st, dtype)
    assert torch.equal(out[:6], expected)
    assert torch.equal(bfp_fake_quantize(x, dtype), out)


def _reference(x: torch.Tensor, dtype: Dtype, block: int) -> torch.Tensor:
    """Per-block loop over a 1-D float64 tensor with Python arithmetic (round() is half-even)."""
    info = FORMATS[dtype]
    m, mmax, sub = info.mbits, 2**info.mbits - 1, info.sub_block_size
    vals = x.double().tolist()
    out: list[float] = []
    for start in range(0, len(vals), block):
        blk = vals[start:start + block]
        amax = max(abs(v) for v in blk)
        e = -127 if amax == 0 else max(-127, min(127, math.frexp(amax)[1] - 1))

        def quant(e: int, blk: list[float] = blk) -> list[tuple[int, int]]:
            res = []
            for i, v in enumerate(blk):
                mu = 0
                if sub is not None:
                    pair = blk[i - i % sub:i - i % sub + sub]
                    mu = int(max(abs(p) for p in pair) < 2.0**e)
                res.append((round(v / 2.0 ** (e - mu - (m - 1))), e - mu - (m - 1)))
            return res

        q = quant(e)
        if sub is None and max(abs(r) for r, _ in q) > mmax:
            q = quant(min(e + 1, 127))
        out.extend(max(-mmax, min(mmax, r)) * 2.0**k for r, k in q)
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("dtype", BFP)
def test_against_per_block_reference(dtype: Dtype) -> None:
    torch.manual_seed(7)
    n = 8 * 12 + 3                               # a partial last block
    x = torch.randn(n) * torch.exp2(torch.randint(-6, 6, (n,)).float())
    x[:8] = torch.tensor([1.999, 1.998, -1.997, 0.5, 0.25, 1e-3, 0, 1.0])   # overflow-prone block
    block = FORMATS[dtype].block_size
    assert torch.equal(bfp_fake_quantize(x, dtype), _reference(x, dtype, block))


@pytest.mark.parametrize("dtype", BFP)
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_round_trip_bitwise_and_storage(dtype: Dtype, axis: int) -> None:
    torch.manual_seed(8)
    x = torch.randn(18, 20, 3) * torch.exp2(torch.randint(-10, 10, (18, 20, 3)).float())
    st = bfp_quantize(x, dtype, axis=axis)
    info = FORMATS[dtype]
    assert isinstance(st, BfpTensor)
    assert st.mantissa.dtype == torch.int8 and st.mantissa.shape == x.shape
    assert int(st.mantissa.abs().max()) <= 2**info.mbits - 1
    assert st.shared_exp.dtype == torch.uint8
    assert st.shared_exp.shape[axis] == math.ceil(x.shape[axis] / info.block_size)
    if info.sub_block_size:
        assert st.micro_exp is not None and st.micro_exp.shape[axis] == math.ceil(x.shape[axis] / 2)
    out = bfp_dequantize(st, dtype, axis=axis)
    fq = bfp_fake_quantize(x, dtype, axis=axis)
    assert torch.equal(fq.view(torch.int32), out.view(torch.int32))
    xb = x.to(torch.bfloat16)
    fqb = bfp_fake_quantize(xb, dtype, axis=axis)
    assert fqb.dtype == torch.bfloat16
    outb = bfp_dequantize(bfp_quantize(xb, dtype, axis=axis), dtype, axis=axis)
    assert torch.equal(fqb, outb.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", BFP)
def test_zero_and_nan_blocks(dtype: Dtype) -> None:
    x = torch.randn(3, 32)
    x[0, :16] = 0.0
    x[1, 3] = float("nan")
    x[2, 17] = -float("inf")
    st = bfp_quantize(x, dtype, block_size=16)
    assert st.shared_exp[0, 0].item() == 0
    assert st.shared_exp[1, 0].item() == 255 and st.shared_exp[2, 1].item() == 255
    out = bfp_dequantize(st, dtype, block_size=16)
    fq = bfp_fake_quantize(x, dtype, block_size=16)
    assert torch.equal(out[0, :16], torch.zeros(16))
    assert out[1, :16].isnan().all() and fq[1, :16].isnan().all()
    assert out[2, 16:].isnan().all() and fq[2, 16:].isnan().all()
    assert not out[1, 16:].isnan().any() and not out[2, :16].isnan().any()
    assert bool(((fq == out) | (fq.isnan() & out.isnan())).all())


def test_errors() -> None:
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="sub-block"):
        bfp_quantize(x, Dtype.mx6, block_size=15)
    with pytest.raises(ValueError, match="mx9"):
        bfp_fake_quantize(x, Dtype.int8)
    st = bfp_quantize(x, Dtype.mx9)
    with pytest.raises(ValueError, match="micro_exp"):
        bfp_dequantize(BfpTensor(st.mantissa, st.shared_exp, None), Dtype.mx9)
    with pytest.raises(ValueError, match="shared_exp has shape"):
        bfp_dequantize(st, Dtype.mx9, block_size=8)
