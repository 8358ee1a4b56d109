"""OCP MX: E8M0 scales, hand-computed blocks, MXINT8, zero/NaN blocks, round trips."""

from __future__ import annotations

import math

import pytest
import torch

from quark.torch.quantization.config.type import Dtype
from quark.torch.quantization.formats import (
    FORMATS,
    MX_ELEMENT_DTYPES,
    code_to_float,
    e8m0_to_float,
    float_to_e8m0,
    mx_dequantize,
    mx_fake_quantize,
    mx_quantize,
)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((((a == b) & (torch.signbit(a) == torch.signbit(b))) | (a.isnan() & b.isnan())).all())


def test_e8m0_all_codes() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    values = e8m0_to_float(codes)
    for c in range(255):
        assert values[c].item() == math.ldexp(1.0, c - 127), c
    assert math.isnan(values[255].item())
    assert values[0].item() == 2.0**-127 and values[254].item() == 2.0**127
    assert torch.equal(float_to_e8m0(values[:255]), codes[:255])
    special = torch.tensor([float("nan"), float("inf"), 0.0, 3.0, 2.0**-140, 1e38 * 10])
    assert float_to_e8m0(special).tolist() == [255, 255, 0, 128, 0, 255]


def test_fp4_hand_example() -> None:
    x = torch.zeros(64)
    # Block 0: amax 5 -> floor(log2 5) = 2, emax(e2m1) = 2 -> shared exponent 0 (code 127), scale 1.
    x[:5] = torch.tensor([5.0, 0.3, -2.6, 0.75, 1.25])
    # Block 1: amax 40 -> floor(log2 40) = 5 -> shared 3 (code 130), scale 8.
    x[32:34] = torch.tensor([40.0, -2.0])
    codes, scale = mx_quantize(x, Dtype.fp4)
    assert scale.tolist() == [127, 130]
    # 5 -> tie 4|6 -> 4 (even mantissa); .3 -> .5; -2.6 -> -3; .75 -> tie .5|1 -> 1; 1.25 -> tie 1|1.5 -> 1
    # 40/8 = 5 -> 4 -> 32; -2/8 = -.25 -> tie -0|-.5 -> -0 (even mantissa)
    assert codes[:5].tolist() == [0b0110, 0b0001, 0b1101, 0b0010, 0b0010]
    assert codes[32:34].tolist() == [0b0110, 0b1000]
    out = mx_dequantize(codes, scale, Dtype.fp4)
    assert out[:5].tolist() == [4.0, 0.5, -3.0, 1.0, 1.0]
    assert out[32:34].tolist() == [32.0, -0.0]
    assert _same(mx_fake_quantize(x, Dtype.fp4), out)


def test_fp8_e4m3_saturates_with_floor_scale() -> None:
    x = torch.zeros(32)
    x[:2] = torch.tensor([1000.0, -1.0])
    codes, scale = mx_quantize(x, Dtype.fp8_e4m3)
    # floor(log2 1000) = 9, emax(e4m3) = 8 -> shared 1 (scale 2); 500 saturates to 448.
    assert scale.tolist() == [128]
    assert codes.dtype == torch.float8_e4m3fn
    assert mx_dequantize(codes, scale, Dtype.fp8_e4m3)[:2].tolist() == [896.0, -1.0]


def test_mxint8_hand_example() -> None:
    x = torch.zeros(96)
    x[:3] = torch.tensor([1.0, 0.3, -0.5])        # amax 1: shared 0, element = round(x * 64)
    x[32:34] = torch.tensor([3.0, -2.999])        # amax 3: shared 1 (scale 2)
    x[64] = 1.999                                 # 1.999 * 64 = 127.94 -> clamp 127
    codes, scale = mx_quantize(x, Dtype.int8)
    assert codes.dtype == torch.int8
    assert scale.tolist() == [127, 128, 127]
    assert codes[:3].tolist() == [64, 19, -32]
    assert codes[32:34].tolist() == [96, -96]
    assert codes[64].item() == 127
    out = mx_dequantize(codes, scale, Dtype.int8)
    assert out[:3].tolist() == [1.0, 19 / 64, -0.5]
    assert out[64].item() == 127 / 64
    assert torch.equal(mx_fake_quantize(x, Dtype.int8), out)


@pytest.mark.parametrize("element", MX_ELEMENT_DTYPES)
def test_zero_block_and_nan_block(element: Dtype) -> None:
    x = torch.randn(3, 96)
    x[0, 32:64] = 0.0
    x[1, 40] = float("nan")
    x[2, 70] = float("inf")
    codes, scale = mx_quantize(x, element)
    assert scale[0, 1].item() == 0                     # 2^-127 for an all-zero block
    assert scale[1, 1].item() == 255 and scale[2, 2].item() == 255
    out = mx_dequantize(codes, scale, element)
    fq = mx_fake_quantize(x, element)
    assert torch.equal(out[0, 32:64], torch.zeros(32)) and torch.equal(fq[0, 32:64], torch.zeros(32))
    assert out[1, 32:64].isnan().all() and fq[1, 32:64].isnan().all()
    assert out[2, 64:96].isnan().all() and fq[2, 64:96].isnan().all()
    finite = torch.ones_like(x, dtype=torch.bool)
    finite[1, 32:64] = False
    finite[2, 64:96] = False
    assert not out[finite].isnan().any()
    assert _same(fq, out)


def _reference_fp8_mx(x: torch.Tensor, tdtype: torch.dtype, emax: int, vmax: float,
                      block: int) -> torch.Tensor:
    """Per-block loop over a 1-D tensor, straight from OCP MX section 6.3."""
    out = torch.empty_like(x)
    for start in range(0, x.numel(), block):
        blk = x[start:start + block]
        amax = blk.abs().max().item()
        shared = -127 if amax == 0 else max(-127, min(127, math.frexp(amax)[1] - 1 - emax))
        s = math.ldexp(1.0, shared)
        out[start:start + block] = (blk / s).clamp(-vmax, vmax).to(tdtype).float() * s
    return out


@pytest.mark.parametrize("dtype, tdtype", [(Dtype.fp8_e4m3, torch.float8_e4m3fn),
                                           (Dtype.fp8_e5m2, torch.float8_e5m2)])
def test_fp8_against_section_6_3_loop(dtype: Dtype, tdtype: torch.dtype) -> None:
    torch.manual_seed(5)
    x = torch.randn(200) * torch.exp2(torch.randint(-20, 20, (200,)).float())
    info = FORMATS[dtype]
    ref = _reference_fp8_mx(x, tdtype, info.emax, info.qmax, 32)
    assert torch.equal(mx_fake_quantize(x, dtype), ref)


@pytest.mark.parametrize("element", MX_ELEMENT_DTYPES)
@pytest.mark.parametrize("axis, block", [(-1, 32), (1, 32), (0, 4), (2, 16), (-2, 32)])
def test_round_trip_bitwise(element: Dtype, axis: int, block: int) -> None:
    torch.manual_seed(6)
    x = torch.randn(5, 40, 24) * torch.exp2(torch.randint(-8, 8, (5, 40, 24)).float())
    x[0, 0, 0] = -0.0
    codes, scale = mx_quantize(x, element, axis=axis, block_size=block)
    expected_shape = list(x.shape)
    expected_shape[axis] = math.ceil(x.shape[axis] / block)   # 40 / 32: last block partial
    assert list(scale.shape) == expected_shape and scale.dtype == torch.uint8
    assert codes.shape == x.shape
    out = mx_dequantize(codes, scale, element, axis=axis, block_size=block)
    assert _same(mx_fake_quantize(x, element, axis=axis, block_size=block), out)
    xb = x.to(torch.bfloat16)
    fq16 = mx_fake_quantize(xb, element, axis=axis, block_size=block)
    assert fq16.dtype == torch.bfloat16
    c16, s16 = mx_quantize(xb, element, axis=axis, block_size=block)
    assert torch.equal(fq16, mx_dequantize(c16, s16, element, axis=axis, block_size=block).to(torch.bfloat16))


@pytest.mark.parametrize("element", [Dtype.fp4, Dtype.fp6_e2m3, Dtype.fp6_e3m2])
def test_small_float_codes_are_bit_patterns(element: Dtype) -> None:
    x = torch.randn(4, 64)
    codes, scale = mx_quantize(x, element)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2 ** FORMATS[element].bits
    values = code_to_float(codes, element)
    assert torch.equal(mx_dequantize(codes, scale, element),
                       values * e8m0_to_float(scale).repeat_interleave(32, dim=-1))


def test_scale_modes() -> None:
    x = torch.zeros(64)
    x[0] = 7.5     # mantissa 1.875: "even" and "ceil" round the exponent up
    x[32] = 5.0    # mantissa 1.25: "even" keeps floor, "ceil" rounds up
    assert mx_quantize(x, Dtype.fp4)[1].tolist() == [127, 127]
    assert mx_quantize(x, Dtype.fp4, scale_mode="even")[1].tolist() == [128, 127]
    assert mx_quantize(x, Dtype.fp4, scale_mode="ceil")[1].tolist() == [128, 128]
    assert mx_fake_quantize(x, Dtype.fp4)[0].item() == 6.0               # saturated
    assert mx_fake_quantize(x, Dtype.fp4, scale_mode="even")[0].item() == 8.0   # 3.75 -> 4, times 2


def test_errors() -> None:
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="fp8_e4m3"):
        mx_quantize(x, Dtype.int4)
    with pytest.raises(ValueError, match="block_size"):
        mx_quantize(x, Dtype.fp4, block_size=0)
    with pytest.raises(ValueError, match="axis"):
        mx_fake_quantize(x, Dtype.fp4, axis=2)
    with pytest.raises(ValueError, match="scale_mode"):
        mx_quantize(x, Dtype.fp4, scale_mode="round")
