"""The reference path gives the same bits on a CUDA device as on CPU (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from quark.torch.quantization.config.type import Dtype
from quark.torch.quantization.formats import (
    MX_ELEMENT_DTYPES,
    bfp_fake_quantize,
    bfp_quantize,
    fake_quantize,
    float_to_code,
    mx_fake_quantize,
    mx_quantize,
    pack_fp6,
    pack_int32,
    pack_uint8_nibbles,
    quantize,
    reduce_amax,
    round_to_float_grid,
)

pytestmark = pytest.mark.gpu


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    if a.is_floating_point() and a.dtype in (torch.float32, torch.bfloat16):
        return bool((((a == b) & (torch.signbit(a) == torch.signbit(b))) | (a.isnan() & b.isnan())).all())
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


@pytest.fixture
def data() -> torch.Tensor:
    torch.manual_seed(12)
    x = torch.randn(64, 200) * torch.exp2(torch.randint(-12, 12, (64, 200)).float())
    x[0, :4] = torch.tensor([0.0, -0.0, float("nan"), float("inf")])
    return x


@pytest.mark.parametrize("dtype", [Dtype.fp8_e4m3, Dtype.fp8_e5m2, Dtype.fp6_e3m2, Dtype.fp6_e2m3, Dtype.fp4])
def test_float_grid_and_codes(data: torch.Tensor, dtype: Dtype) -> None:
    assert _same(round_to_float_grid(data.cuda(), dtype), round_to_float_grid(data, dtype))
    finite = torch.nan_to_num(data, nan=0.0)
    assert _same(float_to_code(finite.cuda(), dtype), float_to_code(finite, dtype))


@pytest.mark.parametrize("dtype", [Dtype.int8, Dtype.uint4, Dtype.fp8_e4m3, Dtype.fp4])
def test_scaled(data: torch.Tensor, dtype: Dtype) -> None:
    x = torch.nan_to_num(data, nan=0.0, posinf=0.0)[:, :172]
    scale = reduce_amax(x, "per_group", ch_axis=-1, group_size=32) / 7 + 1e-6
    kw = dict(qscheme="per_group", ch_axis=-1, group_size=32)
    zp = torch.full(scale.shape, 8) if dtype == Dtype.uint4 else None
    assert _same(fake_quantize(x.cuda(), scale.cuda(), None if zp is None else zp.cuda(), dtype, **kw),
                 fake_quantize(x, scale, zp, dtype, **kw))
    assert _same(quantize(x.cuda(), scale.cuda(), None if zp is None else zp.cuda(), dtype, **kw),
                 quantize(x, scale, zp, dtype, **kw))


@pytest.mark.parametrize("element", MX_ELEMENT_DTYPES)
def test_mx(data: torch.Tensor, element: Dtype) -> None:
    assert _same(mx_fake_quantize(data.cuda(), element), mx_fake_quantize(data, element))
    (cg, sg), (cc, sc) = mx_quantize(data.cuda(), element), mx_quantize(data, element)
    assert _same(cg, cc) and _same(sg, sc)


@pytest.mark.parametrize("dtype", [Dtype.bfp16, Dtype.mx6, Dtype.mx9])
def test_bfp(data: torch.Tensor, dtype: Dtype) -> None:
    assert _same(bfp_fake_quantize(data.cuda(), dtype), bfp_fake_quantize(data, dtype))
    g, c = bfp_quantize(data.cuda(), dtype), bfp_quantize(data, dtype)
    assert _same(g.mantissa, c.mantissa) and _same(g.shared_exp, c.shared_exp)


def test_packing() -> None:
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    assert _same(pack_int32(codes.cuda()), pack_int32(codes))
    assert _same(pack_uint8_nibbles(codes.cuda()), pack_uint8_nibbles(codes))
    assert _same(pack_fp6(codes.cuda()), pack_fp6(codes))
