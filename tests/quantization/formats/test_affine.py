"""quantize / dequantize / fake_quantize for integers, scaled floats and casts."""

from __future__ import annotations

import itertools

import pytest
import torch

from quark.torch.quantization.config.type import Dtype, RoundType
from quark.torch.quantization.formats import (
    FORMATS,
    code_to_float,
    dequantize,
    fake_quantize,
    param_shape,
    quantize,
    reduce_amax,
    round_to_float_grid,
)

INTS = [Dtype.int8, Dtype.uint8, Dtype.int4, Dtype.uint4, Dtype.int2]
SMALL_FLOATS = [Dtype.fp8_e4m3, Dtype.fp8_e5m2, Dtype.fp6_e3m2, Dtype.fp6_e2m3, Dtype.fp4]
SCHEMES = [("per_tensor", None, None), ("per_channel", 0, None), ("per_channel", -1, None),
           ("per_group", -1, 32), ("per_group", 0, 2)]


@pytest.mark.parametrize("method, expected", [
    (RoundType.half_even, [0, 2, 0, -2, 2, 1, 3]),
    (RoundType.round, [1, 2, -1, -2, 3, 1, 3]),
    (RoundType.floor, [0, 1, -1, -2, 2, 1, 2]),
])
def test_int8_round_methods_by_hand(method: RoundType, expected: list[int]) -> None:
    x = torch.tensor([0.25, 0.75, -0.25, -0.75, 1.25, 0.5, 1.49999])   # x / 0.5 = .5 1.5 ... 2.99998
    q = quantize(x, torch.tensor(0.5), None, Dtype.int8, qscheme="per_tensor", round_method=method)
    assert q.dtype == torch.int8
    assert q.tolist() == expected
    fq = fake_quantize(x, torch.tensor(0.5), None, Dtype.int8, qscheme="per_tensor",
                       round_method=method)
    assert torch.equal(fq, torch.tensor(expected, dtype=torch.float32) * 0.5)


def test_round_half_away_is_exact_just_below_half() -> None:
    x = torch.tensor([0.49999997, -0.49999997, 2.5, -2.5])
    q = quantize(x, torch.tensor(1.0), None, "int8", qscheme="per_tensor", round_method="round")
    assert q.tolist() == [0, 0, 3, -3]


def test_uint8_asymmetric_by_hand() -> None:
    x = torch.tensor([-16.0, 0.0, 15.875, 20.0, -20.0, 0.0625])
    scale, zp = torch.tensor(0.125), torch.tensor(128)
    q = quantize(x, scale, zp, Dtype.uint8, qscheme="per_tensor")
    assert q.dtype == torch.uint8
    assert q.tolist() == [0, 128, 255, 255, 0, 128]                     # clamps; 0.5 -> 0 (even)
    q_away = quantize(x, scale, zp, Dtype.uint8, qscheme="per_tensor", round_method="round")
    assert q_away.tolist()[-1] == 129
    d = dequantize(q, scale, zp, Dtype.uint8, qscheme="per_tensor")
    assert d.tolist() == [-16.0, 0.0, 15.875, 15.875, -16.0, 0.0]


def test_int4_and_int2_ranges() -> None:
    x = torch.tensor([-100.0, -8.0, -2.4, 0.0, 6.6, 100.0])
    assert quantize(x, torch.tensor(1.0), None, "int4", qscheme="per_tensor").tolist() == \
        [-8, -8, -2, 0, 7, 7]
    assert quantize(x, torch.tensor(1.0), None, "uint4", qscheme="per_tensor").tolist() == \
        [0, 0, 0, 0, 7, 15]
    assert quantize(x, torch.tensor(1.0), None, "int2", qscheme="per_tensor").tolist() == \
        [-2, -2, -2, 0, 1, 1]


def _reference_int(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, axis: int | None,
                   g: int | None, info_dtype: Dtype) -> torch.Tensor:
    """Straightforward per-element loop: each element finds its own parameter by index."""
    info = FORMATS[info_dtype]
    out = torch.empty_like(x)
    for idx in itertools.product(*[range(s) for s in x.shape]):
        if axis is None:
            pidx: tuple[int, ...] = ()
        elif g is None:
            pidx = (idx[axis],)
        else:
            pl = list(idx)
            pl[axis] = idx[axis] // g
            pidx = tuple(pl)
        s, z = scale[pidx].item(), zp[pidx].item()
        q = min(max(round(x[idx].item() / s) + z, info.qmin), info.qmax)
        out[idx] = (q - z) * s
    return out


@pytest.mark.parametrize("dtype", [Dtype.int8, Dtype.uint4])
@pytest.mark.parametrize("qscheme, axis, g", [("per_tensor", None, None), ("per_channel", 1, None),
                                              ("per_channel", -3, None), ("per_group", -1, 4),
                                              ("per_group", 1, 2)])
def test_int_matches_elementwise_reference(dtype: Dtype, qscheme: str, axis: int | None,
                                           g: int | None) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 3, 10)     # 10 in groups of 4: the last group is partial (2 elements)
    shape = param_shape(x.shape, qscheme, axis, g)
    scale = torch.rand(shape) * 0.1 + 0.01
    zp = torch.randint(0, 16, shape) if dtype == Dtype.uint4 else torch.zeros(shape, dtype=torch.int64)
    fq = fake_quantize(x, scale, zp, dtype, qscheme=qscheme, ch_axis=axis, group_size=g)
    ref = _reference_int(x.double(), scale.double(), zp, axis if axis is None else axis % 3, g, dtype)
    torch.testing.assert_close(fq, ref.float(), rtol=0, atol=1e-6)


# round_method applies to integers only; floats always round to nearest even.
DTYPE_METHODS = [(d, m) for d in INTS for m in RoundType] + [(f, RoundType.half_even) for f in SMALL_FLOATS]


@pytest.mark.parametrize("dtype, method", DTYPE_METHODS)
@pytest.mark.parametrize("qscheme, axis, g", SCHEMES)
def test_fake_quantize_equals_round_trip_bitwise(dtype: Dtype, qscheme: str, axis: int | None,
                                                 g: int | None, method: RoundType) -> None:
    torch.manual_seed(3)
    x = torch.randn(6, 172) * 3
    x[0, :5] = torch.tensor([0.0, -0.0, 1e-30, 1e4, -1e4])
    info = FORMATS[dtype]
    lo, hi = (-2.0, 2.0)
    scale = (torch.rand(param_shape(x.shape, qscheme, axis, g)) + 0.5) * (hi - lo) / (info.qmax - info.qmin)
    zp = None
    if dtype in (Dtype.uint8, Dtype.uint4):
        zp = torch.full(scale.shape, (info.qmax + 1) // 2, dtype=torch.int32)
    kw = dict(qscheme=qscheme, ch_axis=axis, group_size=g)
    q = quantize(x, scale, zp, dtype, round_method=method, **kw)
    d = dequantize(q, scale, zp, dtype, **kw)
    fq = fake_quantize(x, scale, zp, dtype, round_method=method, **kw)
    assert torch.equal(fq.view(torch.int32), d.view(torch.int32))
    x16 = x.to(torch.bfloat16)
    fq16 = fake_quantize(x16, scale, zp, dtype, round_method=method, **kw)
    assert fq16.dtype == torch.bfloat16
    d16 = dequantize(quantize(x16, scale, zp, dtype, round_method=method, **kw), scale, zp, dtype, **kw)
    assert torch.equal(fq16, d16.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [Dtype.int8, Dtype.int4, Dtype.uint8])
def test_error_bound_half_scale_in_range(dtype: Dtype) -> None:
    torch.manual_seed(4)
    x = torch.randn(8, 64)
    info = FORMATS[dtype]
    amax = reduce_amax(x, "per_channel", ch_axis=0)
    if info.signed:
        scale, zp = amax / info.qmax, None   # symmetric: every value is in range
    else:
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        scale = (hi - lo) / (info.qmax - info.qmin)
        zp = torch.round(-lo / scale).clamp(info.qmin, info.qmax)
    fq = fake_quantize(x, scale, zp, dtype, qscheme="per_channel", ch_axis=0)
    err = (x - fq).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("dtype, tdtype", [(Dtype.fp8_e4m3, torch.float8_e4m3fn),
                                           (Dtype.fp8_e5m2, torch.float8_e5m2)])
def test_fp8_quantize_is_saturated_cast(dtype: Dtype, tdtype: torch.dtype) -> None:
    x = torch.randn(4, 16) * 1000
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0])
    q = quantize(x, scale, None, dtype, qscheme="per_channel", ch_axis=0)
    assert q.dtype == tdtype
    vmax = FORMATS[dtype].qmax
    expected = (x / scale[:, None]).clamp(-vmax, vmax).to(tdtype)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(dequantize(q, scale, None, dtype, qscheme="per_channel", ch_axis=0),
                       q.float() * scale[:, None])


def test_fp4_codes_and_values() -> None:
    x = torch.tensor([0.6, -2.6, 100.0, 0.24])
    scale = torch.tensor(0.5)
    q = quantize(x, scale, None, Dtype.fp4, qscheme="per_tensor")
    assert q.dtype == torch.uint8
    # x/scale = 1.2 -> 1.0 (code 2), -5.2 -> -6 (code 8|7), 200 -> 6 (code 7), 0.48 -> 0.5 (code 1)
    assert q.tolist() == [2, 15, 7, 1]
    assert torch.equal(dequantize(q, scale, None, Dtype.fp4, qscheme="per_tensor"),
                       code_to_float(q, Dtype.fp4) * 0.5)
    assert torch.equal(fake_quantize(x, scale, None, Dtype.fp4, qscheme="per_tensor"),
                       round_to_float_grid(x / 0.5, Dtype.fp4) * 0.5)


@pytest.mark.parametrize("dtype, tdtype", [(Dtype.float16, torch.float16), (Dtype.bfloat16, torch.bfloat16)])
def test_casts_ignore_scale(dtype: Dtype, tdtype: torch.dtype) -> None:
    x = torch.randn(5, 7)
    q = quantize(x, None, None, dtype, qscheme="per_tensor")
    assert q.dtype == tdtype and torch.equal(q, x.to(tdtype))
    assert torch.equal(dequantize(q, None, None, dtype, qscheme="per_tensor"), x.to(tdtype).float())
    assert torch.equal(fake_quantize(x, None, None, dtype, qscheme="per_tensor"), x.to(tdtype).float())


def test_zero_scale_gives_zeros_not_nan() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    scale = torch.tensor([0.0, 0.01])
    for dtype in (Dtype.int8, Dtype.fp8_e4m3, Dtype.fp4):
        fq = fake_quantize(x, scale, None, dtype, qscheme="per_channel", ch_axis=0)
        assert not fq.isnan().any()
        assert torch.equal(fq[0], torch.zeros(2))


def test_nan_handling() -> None:
    x = torch.tensor([1.0, float("nan")])
    s = torch.tensor(0.1)
    assert torch.isnan(fake_quantize(x, s, None, Dtype.int8, qscheme="per_tensor")[1])
    assert torch.isnan(fake_quantize(x, s, None, Dtype.fp8_e4m3, qscheme="per_tensor")[1])
    assert torch.isnan(fake_quantize(x, s, None, Dtype.fp4, qscheme="per_tensor")[1])
    with pytest.raises(ValueError, match="NaN"):
        quantize(x, s, None, Dtype.int8, qscheme="per_tensor")
    with pytest.raises(ValueError, match="NaN"):
        quantize(x, s, None, Dtype.fp6_e2m3, qscheme="per_tensor")


def test_errors() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="mx_quantize"):
        quantize(x, torch.tensor(1.0), None, Dtype.mx, qscheme="per_tensor")
    with pytest.raises(ValueError, match="scale is required"):
        quantize(x, None, None, Dtype.int8, qscheme="per_tensor")
    with pytest.raises(ValueError, match="round_method"):
        quantize(x, torch.tensor(1.0), None, Dtype.int8, qscheme="per_tensor", round_method="ceil")
    with pytest.raises(ValueError, match="per_channel parameter"):
        quantize(x, torch.ones(8), None, Dtype.int8, qscheme="per_channel", ch_axis=0)


@pytest.mark.parametrize(("dtype", "qscheme", "axis", "group", "shape"), [
    ("uint4", "per_group", -1, 16, (37, 64)), ("int4", "per_group", 0, 8, (40, 6)),
    ("int8", "per_channel", 0, None, (37, 16)), ("int8", "per_channel", 1, None, (37, 16)),
    ("fp8_e4m3", "per_tensor", None, None, (37, 16)), ("fp4", "per_channel", 0, None, (37, 16)),
    ("uint4", "per_group", -1, 16, (5, 7, 32)), ("uint4", "per_group", -1, 16, (6, 60))])
def test_large_tensors_quantize_in_row_chunks_with_the_same_results(monkeypatch: pytest.MonkeyPatch, dtype, qscheme,
                                                                    axis, group, shape) -> None:
    """quantize / fake_quantize take a large tensor a few rows at a time (bounded float32 temporaries): the same
    codes and values as in one step, for parameters per row, per column, per group and per tensor."""
    from quark.torch.quantization.formats import affine
    from quark.torch.quantization.formats.granularity import param_shape

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen).to(torch.bfloat16)
    pshape = param_shape(shape, qscheme, axis, group)
    scale = torch.rand(pshape, generator=gen) * 0.1 + 0.01
    zero = torch.randint(0, 8, pshape, generator=gen).float() if dtype == "uint4" else None
    grid = dict(qscheme=qscheme, ch_axis=axis, group_size=group)
    whole = (affine.quantize(x, scale, zero, dtype, **grid), affine.fake_quantize(x, scale, zero, dtype, **grid))
    steps = []
    monkeypatch.setattr(affine, "CHUNK_ELEMENTS", 40)  # a few rows per step
    real = affine._fake_quantize_with
    monkeypatch.setattr(affine, "_fake_quantize_with", lambda part, *a: steps.append(part.shape[0]) or real(part, *a))
    chunked = (affine.quantize(x, scale, zero, dtype, **grid), affine.fake_quantize(x, scale, zero, dtype, **grid))
    assert len(steps) > 1  # fake_quantize went in several steps
    for a, b in zip(whole, chunked):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a, b.view(torch.uint8)
                           if b.dtype.itemsize == 1 else b)
    if dtype in ("uint4", "int8"):  # a NaN in a later step is refused by name, as in one step
        x[-1, 0] = float("nan")
        with pytest.raises(ValueError, match="contains NaN"):
            affine.quantize(x, scale, zero, dtype, **grid)
