"""FP8/FP6/FP4 grids and bit patterns against torch's casts and the OCP specs' code tables."""

from __future__ import annotations

import pytest
import torch

from quark.torch.quantization.config.type import Dtype
from quark.torch.quantization.formats import (
    FORMATS,
    code_to_float,
    float_to_code,
    round_to_float_grid,
)

FP8 = [(Dtype.fp8_e4m3, torch.float8_e4m3fn), (Dtype.fp8_e5m2, torch.float8_e5m2)]

# Non-negative halves of the OCP MX v1.0 section 5.3 code tables, written out by hand
# (codes 0 .. 2^(bits-1) - 1; the negative half is the same with the sign bit set).
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M3 = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875,  # subnormals, 2^0 * m/8
        1.0, 1.125, 1.25, 1.375, 1.5, 1.625, 1.75, 1.875,
        2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75,
        4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5]
E3M2 = [0.0, 0.0625, 0.125, 0.1875,  # subnormals, 2^-2 * m/4
        0.25, 0.3125, 0.375, 0.4375, 0.5, 0.625, 0.75, 0.875,
        1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5,
        4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0,
        16.0, 20.0, 24.0, 28.0]
SMALL = [(Dtype.fp4, E2M1), (Dtype.fp6_e2m3, E2M3), (Dtype.fp6_e3m2, E3M2)]


def _full_table(half: list[float]) -> torch.Tensor:
    pos = torch.tensor(half, dtype=torch.float32)
    return torch.cat([pos, -pos])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of float32 tensors, NaN == NaN, -0 != +0."""
    return torch.equal(a.float().view(torch.int32), b.float().view(torch.int32)) or (
        bool(((a == b) & (torch.signbit(a) == torch.signbit(b)) | (a.isnan() & b.isnan())).all()))


@pytest.mark.parametrize("dtype, tdtype", FP8)
def test_fp8_grid_equals_torch_cast_exhaustively(dtype: Dtype, tdtype: torch.dtype) -> None:
    torch.manual_seed(0)
    vmax = FORMATS[dtype].qmax
    values = torch.arange(256, dtype=torch.uint8).view(tdtype).float()
    finite = values[torch.isfinite(values)].unique()  # sorted
    mids = (finite[:-1] + finite[1:]) / 2
    near_mids = torch.cat([torch.nextafter(mids, torch.tensor(float("inf"))),
                           torch.nextafter(mids, torch.tensor(-float("inf")))])
    tiny = 2.0 ** (1 - FORMATS[dtype].exp_bias - FORMATS[dtype].mbits)
    x = torch.cat([
        values, mids, near_mids,
        torch.randn(20000) * vmax / 4,
        torch.randn(5000) * tiny * 8,                      # subnormal range
        torch.tensor([vmax * 1.01, -vmax * 1.5, 1e30, -1e30, float("inf"), -float("inf"),
                      float("nan"), 0.0, -0.0, 1e-42, -1e-42, tiny / 2, -tiny / 2]),
    ])
    ref = x.clamp(-vmax, vmax).to(tdtype).float()
    assert _same(round_to_float_grid(x, dtype), ref)


@pytest.mark.parametrize("dtype, tdtype", FP8)
def test_fp8_grid_keeps_input_dtype(dtype: Dtype, tdtype: torch.dtype) -> None:
    x = torch.randn(257).to(torch.bfloat16) * 30
    out = round_to_float_grid(x, dtype)
    assert out.dtype == torch.bfloat16
    vmax = FORMATS[dtype].qmax
    assert torch.equal(out, x.float().clamp(-vmax, vmax).to(tdtype).to(torch.bfloat16))


def test_fp8_e4m3_ties_to_even() -> None:
    x = torch.tensor([1.0625, 1.1875, 448.0 + 16.0, 2.0**-10, 3 * 2.0**-10])
    # 1.0625 is halfway 1.0|1.125 -> 1.0 (even); 1.1875 halfway 1.125|1.25 -> 1.25; 464 saturates;
    # 2^-10 is half the smallest subnormal 2^-9 -> 0; 3*2^-10 halfway 2^-9|2^-8 -> 2^-8.
    expected = torch.tensor([1.0, 1.25, 448.0, 0.0, 2.0**-8])
    assert torch.equal(round_to_float_grid(x, Dtype.fp8_e4m3), expected)


@pytest.mark.parametrize("dtype, tdtype", FP8)
def test_fp8_codes_are_torch_bytes(dtype: Dtype, tdtype: torch.dtype) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(tdtype).float()
    assert _same(code_to_float(codes, dtype), values)
    assert _same(code_to_float(codes.view(tdtype), dtype), values)
    finite = torch.isfinite(values)
    assert torch.equal(float_to_code(values[finite], dtype), codes[finite])


@pytest.mark.parametrize("dtype, half", SMALL)
def test_small_float_code_tables(dtype: Dtype, half: list[float]) -> None:
    n = 2 ** FORMATS[dtype].bits
    codes = torch.arange(n, dtype=torch.uint8)
    table = _full_table(half)
    decoded = code_to_float(codes, dtype)
    assert _same(decoded, table)                       # includes -0.0 at the sign-only code
    assert torch.equal(float_to_code(table, dtype), codes)
    assert FORMATS[dtype].qmax == max(half)


def _nearest_even_reference(x: torch.Tensor, half: list[float]) -> torch.Tensor:
    """Brute force: the grid value nearest to |x| (ties to the even code), saturating, signed."""
    grid = torch.tensor(half, dtype=torch.float64)
    a = x.double().abs().clamp(max=grid[-1].item())
    dist = (a[:, None] - grid[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    tie_ok = dist == best
    codes = torch.arange(len(half))
    # Among the nearest codes prefer an even one (even mantissa LSB).
    score = tie_ok.long() * 2 + ((codes % 2) == 0).long()[None, :] * tie_ok.long()
    pick = grid[score.argmax(dim=1)]
    return torch.copysign(pick, x.double()).float()


@pytest.mark.parametrize("dtype, half", SMALL)
def test_small_float_rounding_against_brute_force(dtype: Dtype, half: list[float]) -> None:
    torch.manual_seed(1)
    grid = torch.tensor(half)
    mids = (grid[:-1] + grid[1:]) / 2
    x = torch.cat([grid, -grid, mids, -mids, torch.randn(4000) * grid[-1] / 2,
                   torch.tensor([grid[-1] * 3, -grid[-1] * 3, 1e-30, float("inf"), -float("inf")])])
    got = round_to_float_grid(x, dtype)
    assert _same(got, _nearest_even_reference(x, half))
    assert _same(code_to_float(float_to_code(x, dtype), dtype), got)


def test_errors() -> None:
    with pytest.raises(ValueError, match="NaN"):
        float_to_code(torch.tensor([1.0, float("nan")]), Dtype.fp4)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        code_to_float(torch.tensor([16], dtype=torch.uint8), Dtype.fp4)
    with pytest.raises(ValueError, match="fp8_e4m3"):
        round_to_float_grid(torch.zeros(2), Dtype.int8)
    with pytest.raises(ValueError, match="dtype"):
        round_to_float_grid(torch.zeros(2), "fp7")
