"""Property-based tests (hypothesis) of every numeric format and of ``QuantizationSpec`` construction.

For generated tensors (odd shapes; values spanning subnormals to near float32's max, with NaN and
Inf in the non-finite properties) and generated specs, each format ends in a correct result or a
documented ``ValueError``:

- ``dequantize(quantize(x)) == fake_quantize(x)`` bit for bit;
- ``fake_quantize`` is idempotent;
- every fake-quantized value lies on the format's grid (integer codes in range; float elements on
  the element grid; block mantissas within the element range);
- within the representable range ``|x - q(x)|`` is at most half a grid step; beyond it values
  saturate to the largest magnitude of the right sign;
- non-finite inputs: the quantizers refuse them (``NonFiniteTensorError``); the format functions
  keep the documented behaviour (NaN stays NaN, Inf saturates, a block holding NaN/Inf decodes as
  NaN) and never let a non-finite value change another element or block.

Each property runs ``max_examples=1000`` in the default run over every format of its family
(the format is drawn per case); the ``slow`` variants run ``SLOW_EXAMPLES`` per format (and
``SPEC_SLOW_EXAMPLES`` spec constructions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quark.torch.quantization import formats
from quark.torch.quantization.config.config import QuantizationSpec
from quark.torch.quantization.config.spec import SPEC_KEYS
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType, ScaleType, ZeroPointType
from quark.torch.quantization.formats.floats import round_to_float_grid
from quark.torch.quantization.formats.table import FORMATS, MX_ELEMENT_DTYPES
from quark.torch.quantization.tensor_quantize import FakeQuantize, NonFiniteTensorError, compute_qparams

DEFAULT_EXAMPLES = 1000
SLOW_EXAMPLES = 1000  # per format (the default run draws the format: ~1000 / number of formats each)
SPEC_SLOW_EXAMPLES = 10000
_SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

AFFINE_DTYPES = (Dtype.int2, Dtype.int4, Dtype.int8, Dtype.uint4, Dtype.uint8, Dtype.fp8_e4m3,
                 Dtype.fp8_e5m2, Dtype.fp6_e3m2, Dtype.fp6_e2m3, Dtype.fp4)
BFP_DTYPES = (Dtype.mx6, Dtype.mx9, Dtype.bfp16)
MX_SCALE_MODES = ("floor", "ceil", "even")
F32_MAX = torch.finfo(torch.float32).max


def _run(check: Callable[[Any], None], strategy: st.SearchStrategy[Any], examples: int) -> None:
    """Run ``check`` as a hypothesis property on ``examples`` cases drawn from ``strategy``."""
    @settings(max_examples=examples, **_SETTINGS)  # type: ignore[arg-type]
    @given(case=strategy)
    def prop(case: Any) -> None:
        check(case)

    prop()


# ------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------
def _finite_values() -> st.SearchStrategy[float]:
    """Float32 values of every magnitude: zeros, subnormals, ordinary values and huge ones."""
    return st.one_of(
        st.floats(-4.0, 4.0, width=32),
        st.floats(width=32, allow_nan=False, allow_infinity=False),
        st.sampled_from([0.0, -0.0, 2.0**-149, -(2.0**-149), 2.0**-126, 3.4e38, -3.4e38, 0.5, -0.5]),
        st.floats(-2.0**-126, 2.0**-126, width=32),  # subnormals and the smallest normals
    )


@st.composite
def tensors(draw: st.DrawFn, *, non_finite: bool = False, max_dims: int = 3) -> torch.Tensor:
    """A small float32 tensor of odd shape: seeded normal values at a drawn magnitude (2^-140 ..
    2^120), some elements replaced by drawn values of every kind (zeros, subnormals, values next
    to float32's max); with ``non_finite`` at least one NaN or +-Inf."""
    ndim = draw(st.integers(1, max_dims))
    shape = tuple(draw(st.lists(st.integers(1, 37 if ndim == 1 else 7), min_size=ndim, max_size=ndim)))
    n = math.prod(shape)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    magnitude = 2.0 ** draw(st.integers(-140, 120))
    x = (torch.randn(n, generator=generator, dtype=torch.float64) * magnitude).float()
    specials = draw(st.lists(st.tuples(st.integers(0, n - 1), _finite_values()), max_size=6))
    if non_finite:
        specials += draw(st.lists(st.tuples(st.integers(0, n - 1),
                                            st.sampled_from([math.nan, math.inf, -math.inf])),
                                  min_size=1, max_size=3))
    for index, value in specials:
        x[index] = value
    return x.reshape(shape)


@dataclass
class AffineCase:
    x: torch.Tensor
    spec: QuantizationSpec


@st.composite
def affine_cases(draw: st.DrawFn, dtype: Dtype, non_finite: bool = False) -> AffineCase | ValueError:
    """A tensor and a generated spec for ``dtype`` (or the ValueError the spec's construction gave)."""
    x = draw(tensors(non_finite=non_finite))
    info = FORMATS[dtype]
    qscheme = draw(st.sampled_from(list(QSchemeType)))
    fields: dict[str, object] = {"dtype": dtype, "qscheme": qscheme}
    if qscheme != QSchemeType.per_tensor:
        fields["ch_axis"] = draw(st.integers(-x.ndim, x.ndim - 1))
    if qscheme == QSchemeType.per_group:
        fields["group_size"] = draw(st.integers(1, 40))
    if info.kind == "int":
        fields["symmetric"] = draw(st.booleans())
        fields["round_method"] = draw(st.sampled_from(list(RoundType)))
    fields["scale_type"] = draw(st.sampled_from([ScaleType.float, ScaleType.pof2]))
    try:
        spec = QuantizationSpec(**fields)  # type: ignore[arg-type]
    except ValueError as e:  # documented refusals (e.g. an observer that does not fit)
        return e
    return AffineCase(x, spec)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN == NaN (signed zeros compare equal: -0.0 == 0.0)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _float_half_step(v: torch.Tensor, dtype: Dtype) -> torch.Tensor:
    """Half the grid spacing of float element ``dtype`` at element values ``v`` (finite)."""
    info = FORMATS[dtype]
    min_normal_exp = 1 - info.exp_bias
    _, e = torch.frexp(v.abs().double())
    exp = torch.clamp(e.to(torch.int64) - 1, min=min_normal_exp)
    return torch.pow(2.0, (exp - info.mbits - 1).double())


def _grid_reach(scale: torch.Tensor, zp: torch.Tensor | None, dtype: Dtype) -> float:
    """The largest magnitude any code of ``dtype`` dequantizes to under ``scale`` (float64)."""
    info = FORMATS[dtype]
    s = scale.double().abs()
    if info.kind != "int":
        return float((info.qmax * s).max())
    z = torch.zeros_like(s) if zp is None else zp.double()
    return float((torch.maximum((info.qmax - z).abs(), (info.qmin - z).abs()) * s).max())


def _params(spec: QuantizationSpec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    scale, zero_point = compute_qparams(x, spec)
    zp = zero_point if FORMATS[spec.dtype].kind == "int" else None
    return scale, zp


def _affine_call(fn: Callable[..., torch.Tensor], x: torch.Tensor, spec: QuantizationSpec,
                 scale: torch.Tensor, zp: torch.Tensor | None, **extra: object) -> torch.Tensor:
    return fn(x, scale, zp, spec.dtype, qscheme=spec.qscheme, ch_axis=spec.ch_axis,
              group_size=spec.group_size, **extra)


# ------------------------------------------------------------------------------------------------
# affine formats: int2/4/8, uint4/8, fp8 e4m3/e5m2, fp6 e3m2/e2m3, fp4
# ------------------------------------------------------------------------------------------------
def check_affine(case: AffineCase | ValueError) -> None:
    if isinstance(case, ValueError):
        assert "QuantizationSpec" in str(case)
        return
    x, spec = case.x, case.spec
    info = FORMATS[spec.dtype]
    try:
        scale, zp = _params(spec, x)
    except ValueError as e:  # the spec does not fit x's shape: documented, names the granularity
        assert "ch_axis" in str(e) or "group_size" in str(e) or "axis" in str(e), str(e)
        return
    rnd = spec.round_method
    if not bool(torch.isfinite(scale.float()).all()):
        # a range beyond float32 (e.g. asymmetric [-3.4e38, 3.4e38]): refused, naming the scale
        with pytest.raises(ValueError, match="scale"):
            _affine_call(formats.fake_quantize, x, spec, scale, zp, round_method=rnd)
        with pytest.raises(NonFiniteTensorError, match=r"w\.scale"):
            FakeQuantize(spec, name="w").calibrate_from(x)
        return
    if _grid_reach(scale, zp, spec.dtype) > F32_MAX:
        # a range next to float32's max whose grid (pof2-rounded, or qmin * scale) passes it: refused
        for fn in (formats.fake_quantize, formats.quantize):
            with pytest.raises(ValueError, match="beyond float32's range"):
                _affine_call(fn, x, spec, scale, zp, round_method=rnd)
        return
    fq = _affine_call(formats.fake_quantize, x, spec, scale, zp, round_method=rnd)
    codes = _affine_call(formats.quantize, x, spec, scale, zp, round_method=rnd)
    dq = _affine_call(formats.dequantize, codes, spec, scale, zp)
    assert fq.shape == x.shape and fq.dtype == x.dtype
    assert _bits_equal(dq, fq), "dequantize(quantize(x)) != fake_quantize(x)"
    again = _affine_call(formats.fake_quantize, fq, spec, scale, zp, round_method=rnd)
    s = formats.broadcast_param(scale.float(), x.shape, spec.qscheme, spec.ch_axis, spec.group_size).double()
    if rnd == RoundType.floor:
        # Known limit: (level * s) / s can land one ulp below the level in float32, and floor then
        # takes the level below; re-quantizing moves a value by at most one step, never more. Both
        # values are float32 numbers of up to ~255 steps, so each carries half an ulp of rounding.
        rounding = (again.double().abs() + fq.double().abs()) * 2.0**-24
        moved = (again.double() - fq.double()).abs()
        assert bool((moved <= s * (1 + 1e-5) + rounding).all()), "floor moved > 1 step"
    else:
        assert _bits_equal(again, fq), "fake_quantize is not idempotent"
    assert bool(torch.isfinite(fq).all())

    xd = x.double()
    if info.kind == "int":
        assert int(codes.min()) >= info.qmin and int(codes.max()) <= info.qmax  # on the integer grid
        z = torch.zeros_like(s) if zp is None else formats.broadcast_param(
            zp.float(), x.shape, spec.qscheme, spec.ch_axis, spec.group_size).double()
        level = xd / s + z
        inside = (level >= info.qmin - 0.5) & (level <= info.qmax + 0.5)
        half_step = s / 2 if rnd != RoundType.floor else s
        err = (xd - fq.double()).abs()
        tol = half_step * (1 + 1e-5) + xd.abs() * 2**-22
        assert bool((err <= tol)[inside].all()), "error above half a step inside the range"
        lo, hi = (info.qmin - z) * s, (info.qmax - z) * s
        low_side = ~inside & (level < info.qmin)
        high_side = ~inside & (level > info.qmax)
        torch.testing.assert_close(fq.double()[low_side], lo[low_side], rtol=1e-6, atol=0)
        torch.testing.assert_close(fq.double()[high_side], hi[high_side], rtol=1e-6, atol=0)
        return
    elements = formats.code_to_float(codes, spec.dtype).double()
    assert bool((elements.abs() <= info.qmax).all())
    on_grid = round_to_float_grid(elements.float(), spec.dtype).double()
    assert torch.equal(on_grid, elements), "element off the float grid"
    v = xd / s
    inside = v.abs() <= info.qmax
    err = (v - elements).abs()
    tol = _float_half_step(v, spec.dtype) * (1 + 1e-5) + v.abs() * 2**-22
    assert bool((err <= tol)[inside].all()), "error above half a step inside the range"
    assert bool((elements.abs()[~inside] == info.qmax).all()), "out-of-range element does not saturate"
    assert bool((torch.sign(elements[~inside]) == torch.sign(v[~inside])).all())


def test_affine_format_properties() -> None:
    _run(check_affine, st.sampled_from(AFFINE_DTYPES).flatmap(affine_cases), DEFAULT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", AFFINE_DTYPES, ids=lambda d: d.name)
def test_affine_format_properties_slow(dtype: Dtype) -> None:
    _run(check_affine, affine_cases(dtype), SLOW_EXAMPLES)


def check_affine_non_finite(case: AffineCase | ValueError, scale_value: float) -> None:
    """Observer-derived qparams of a non-finite tensor are refused; with a given finite scale,
    NaN stays NaN, Inf saturates and finite elements are unaffected by their neighbours."""
    if isinstance(case, ValueError):
        return
    x, spec = case.x, case.spec
    with pytest.raises(NonFiniteTensorError, match=r"w: tensor of shape"):
        FakeQuantize(spec, name="w").calibrate_from(x)
    info = FORMATS[spec.dtype]
    scale = torch.tensor(scale_value)
    zp = torch.tensor(float((info.qmax + info.qmin + 1) // 2)) if info.kind == "int" and not info.signed else None
    fq = formats.fake_quantize(x, scale, zp, spec.dtype, qscheme="per_tensor", round_method=spec.round_method)
    finite = torch.isfinite(x)
    clean = formats.fake_quantize(torch.where(finite, x, torch.zeros_like(x)), scale, zp, spec.dtype,
                                  qscheme="per_tensor", round_method=spec.round_method)
    assert _bits_equal(fq[finite], clean[finite])
    assert bool(fq[x.isnan()].isnan().all())
    top = formats.fake_quantize(torch.tensor([F32_MAX, -F32_MAX]), scale, zp, spec.dtype, qscheme="per_tensor")
    assert bool((fq[x == math.inf] == top[0]).all()) and bool((fq[x == -math.inf] == top[1]).all())
    if info.kind == "int" and bool(x.isnan().any()):
        with pytest.raises(ValueError, match="NaN"):
            formats.quantize(x, scale, zp, spec.dtype, qscheme="per_tensor")


def _affine_non_finite_cases(dtype: Dtype) -> st.SearchStrategy[tuple[AffineCase | ValueError, float]]:
    return st.tuples(affine_cases(dtype, non_finite=True), st.sampled_from([1e-3, 0.37, 1.0, 1e4]))


def test_affine_format_non_finite_inputs() -> None:
    _run(lambda case: check_affine_non_finite(*case),
         st.sampled_from(AFFINE_DTYPES).flatmap(_affine_non_finite_cases), DEFAULT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", AFFINE_DTYPES, ids=lambda d: d.name)
def test_affine_format_non_finite_inputs_slow(dtype: Dtype) -> None:
    _run(lambda case: check_affine_non_finite(*case), _affine_non_finite_cases(dtype), SLOW_EXAMPLES)


# ------------------------------------------------------------------------------------------------
# OCP MX: each element type
# ------------------------------------------------------------------------------------------------
@st.composite
def block_cases(draw: st.DrawFn, non_finite: bool = False) -> tuple[torch.Tensor, int, int]:
    x = draw(tensors(non_finite=non_finite))
    axis = draw(st.integers(-x.ndim, x.ndim - 1))
    block = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    return x, axis, block


def _mx_element_grid_check(elements: torch.Tensor, element: Dtype) -> None:
    info = FORMATS[element]
    if info.kind == "int":  # MXINT8: multiples of 2^-6 within [-127, 127] * 2^-6
        m = elements * 64
        assert torch.equal(m, torch.round(m)) and bool((m.abs() <= 127).all())
        return
    assert bool((elements.abs() <= info.qmax).all())
    assert torch.equal(round_to_float_grid(elements.float(), element).double(), elements)


def check_mx(x: torch.Tensor, axis: int, block: int, element: Dtype, mode: str) -> None:
    fq = formats.mx_fake_quantize(x, element, axis=axis, block_size=block, scale_mode=mode)
    codes, scale_codes = formats.mx_quantize(x, element, axis=axis, block_size=block, scale_mode=mode)
    dq = formats.mx_dequantize(codes, scale_codes, element, axis=axis, block_size=block)
    assert fq.shape == x.shape
    assert _bits_equal(dq, fq), "mx_dequantize(mx_quantize(x)) != mx_fake_quantize(x)"
    again = formats.mx_fake_quantize(fq, element, axis=axis, block_size=block, scale_mode=mode)
    assert _bits_equal(again, fq), "mx_fake_quantize is not idempotent"
    assert bool(torch.isfinite(fq).all())
    scale = formats.broadcast_param(formats.e8m0_to_float(scale_codes), x.shape, QSchemeType.per_group,
                                    axis, block).double()
    elements = fq.double() / scale
    _mx_element_grid_check(elements, element)
    info = FORMATS[element]
    v = x.double() / scale
    if info.kind == "int":
        top, half = 127 / 64, torch.full_like(v, 2.0**-7)
    else:
        top, half = info.qmax, _float_half_step(v, element)
    inside = v.abs() <= top
    err = (v - elements).abs()
    assert bool((err <= half * (1 + 1e-5) + v.abs() * 2**-22)[inside].all()), "error above half a step"
    assert bool((elements.abs()[~inside] == top).all()), "out-of-range element does not saturate"


def check_block_non_finite(x: torch.Tensor, axis: int, block: int,
                           fake: Callable[[torch.Tensor], torch.Tensor], spec: QuantizationSpec) -> None:
    """A block holding NaN/Inf decodes as NaN, other blocks are untouched; the quantizer refuses it."""
    fq = fake(x)
    bad = ~torch.isfinite(x)
    bad_blocks = formats.reduce_amax(bad.float(), QSchemeType.per_group, ch_axis=axis, group_size=block) > 0
    bad_elements = formats.broadcast_param(bad_blocks, x.shape, QSchemeType.per_group, axis, block)
    assert bool(fq[bad_elements].isnan().all())
    clean = fake(torch.where(bad, torch.zeros_like(x), x))
    assert _bits_equal(fq[~bad_elements], clean[~bad_elements])
    with pytest.raises(NonFiniteTensorError, match=r"w: tensor of shape"):
        FakeQuantize(spec, name="w").calibrate_from(x)


def _mx_cases(element: Dtype, non_finite: bool = False) -> st.SearchStrategy[tuple[object, ...]]:
    return st.tuples(block_cases(non_finite=non_finite), st.just(element), st.sampled_from(MX_SCALE_MODES))


def check_mx_non_finite(case: tuple[torch.Tensor, int, int], element: Dtype, mode: str) -> None:
    x, axis, block = case
    spec = QuantizationSpec(dtype=Dtype.mx, mx_element_dtype=element, qscheme=QSchemeType.per_group,
                            ch_axis=axis, group_size=block, scale_calculation_mode=mode)

    def fake(t: torch.Tensor) -> torch.Tensor:
        return formats.mx_fake_quantize(t, element, axis=axis, block_size=block, scale_mode=mode)
    check_block_non_finite(x, axis, block, fake, spec)


def test_mx_format_properties() -> None:
    _run(lambda c: check_mx(*c[0], c[1], c[2]), st.sampled_from(MX_ELEMENT_DTYPES).flatmap(_mx_cases),
         DEFAULT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("element", MX_ELEMENT_DTYPES, ids=lambda d: d.name)
def test_mx_format_properties_slow(element: Dtype) -> None:
    _run(lambda c: check_mx(*c[0], c[1], c[2]), _mx_cases(element), SLOW_EXAMPLES)


def test_mx_format_non_finite_inputs() -> None:
    _run(lambda c: check_mx_non_finite(*c),
         st.sampled_from(MX_ELEMENT_DTYPES).flatmap(lambda e: _mx_cases(e, non_finite=True)), DEFAULT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("element", MX_ELEMENT_DTYPES, ids=lambda d: d.name)
def test_mx_format_non_finite_inputs_slow(element: Dtype) -> None:
    _run(lambda c: check_mx_non_finite(*c), _mx_cases(element, non_finite=True), SLOW_EXAMPLES)


# ------------------------------------------------------------------------------------------------
# shared-exponent formats: MX6, MX9, BFP16
# ------------------------------------------------------------------------------------------------
@st.composite
def bfp_cases(draw: st.DrawFn, dtype: Dtype, non_finite: bool = False) -> tuple[torch.Tensor, int, int]:
    x = draw(tensors(non_finite=non_finite))
    axis = draw(st.integers(-x.ndim, x.ndim - 1))
    info = FORMATS[dtype]
    unit = info.sub_block_size or 1
    block = unit * draw(st.integers(1, 20 // unit))
    return x, axis, block


def check_bfp(x: torch.Tensor, axis: int, block: int, dtype: Dtype) -> None:
    fq = formats.bfp_fake_quantize(x, dtype, axis=axis, block_size=block)
    stored = formats.bfp_quantize(x, dtype, axis=axis, block_size=block)
    dq = formats.bfp_dequantize(stored, dtype, axis=axis, block_size=block)
    assert fq.shape == x.shape
    assert _bits_equal(dq, fq), "bfp_dequantize(bfp_quantize(x)) != bfp_fake_quantize(x)"
    assert bool(torch.isfinite(fq).all())
    info = FORMATS[dtype]
    mmax = 2**info.mbits - 1
    # BFP16 mantissas are int8 (-128 kept, as amd-quark 0.13); MX6/MX9 are sign + magnitude
    mmin = -mmax - 1 if info.sub_block_size is None else -mmax
    mant = stored.mantissa.int()
    # Idempotent, except a BFP16 block holding -128 (= -2^(E+1)): quantized again, its maximum is a
    # power of two one exponent up, so the block re-rounds on a coarser step (amd-quark 0.13 does the same).
    if not bool((mant == -mmax - 1).any()) or info.sub_block_size is not None:
        again = formats.bfp_fake_quantize(fq, dtype, axis=axis, block_size=block)
        assert _bits_equal(again, fq), "bfp_fake_quantize is not idempotent"
    assert int(mant.max()) <= mmax and int(mant.min()) >= mmin  # on the grid: integer mantissas in range
    unit = formats.BfpTensor(mantissa=torch.ones_like(stored.mantissa), shared_exp=stored.shared_exp,
                             micro_exp=stored.micro_exp)
    step = formats.bfp_dequantize(unit, dtype, axis=axis, block_size=block).double()  # per-element step
    v = x.double() / step
    # a BFP16 block at the top exponent (step 2^121) saturates at -127: -128 * 2^121 is past float32
    top = step == 2.0 ** (127 - (info.mbits - 1))
    low = torch.where(top, torch.full_like(v, -mmax), torch.full_like(v, mmin))
    inside = (v <= mmax) & (v >= low)
    err = (x.double() - fq.double()).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + x.double().abs() * 2**-22)[inside].all())
    limit = torch.where(v > 0, mmax * step, -low * step)  # saturation
    assert bool((fq.double().abs()[~inside] <= limit[~inside]).all())
    assert bool((fq.double().abs()[~inside] >= (mmax * step)[~inside]).all())


def check_bfp_non_finite(case: tuple[torch.Tensor, int, int], dtype: Dtype) -> None:
    x, axis, block = case
    spec = QuantizationSpec(dtype=dtype, qscheme=QSchemeType.per_group, ch_axis=axis, group_size=block)

    def fake(t: torch.Tensor) -> torch.Tensor:
        return formats.bfp_fake_quantize(t, dtype, axis=axis, block_size=block)
    check_block_non_finite(x, axis, block, fake, spec)


def _bfp_cases(dtype: Dtype, non_finite: bool = False) -> st.SearchStrategy[tuple[object, ...]]:
    return st.tuples(bfp_cases(dtype, non_finite=non_finite), st.just(dtype))


def test_bfp_format_properties() -> None:
    _run(lambda c: check_bfp(*c[0], c[1]), st.sampled_from(BFP_DTYPES).flatmap(_bfp_cases), DEFAULT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", BFP_DTYPES, ids=lambda d: d.name)
def test_bfp_format_properties_slow(dtype: Dtype) -> None:
    _run(lambda c: check_bfp(*c[0], c[1]), _bfp_cases(dtype), SLOW_EXAMPLES)


def test_bfp_format_non_finite_inputs() -> None:
    _run(lambda c: check_bfp_non_finite(*c),
         st.sampled_from(BFP_DTYPES).flatmap(lambda d: _bfp_cases(d, non_finite=True)), DEFAULT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", BFP_DTYPES, ids=lambda d: d.name)
def test_bfp_format_non_finite_inputs_slow(dtype: Dtype) -> None:
    _run(lambda c: check_bfp_non_finite(*c), _bfp_cases(dtype, non_finite=True), SLOW_EXAMPLES)


# ------------------------------------------------------------------------------------------------
# QuantizationSpec construction from random field values
# ------------------------------------------------------------------------------------------------
_ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**400), 10**400), st.integers(-70, 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from([2**62, 2**64, -1, 0, 1, 16, 32, 128]), st.lists(st.integers(), max_size=2),
)
_GOOD_VALUES: dict[str, st.SearchStrategy[object]] = {
    "dtype": st.sampled_from([*Dtype, *(d.name for d in Dtype)]),
    "is_dynamic": st.sampled_from([None, True, False]),
    "qscheme": st.sampled_from([None, *QSchemeType, "per_group"]),
    "ch_axis": st.sampled_from([None, -1, 0, 1]),
    "group_size": st.sampled_from([None, 8, 16, 32, 128]),
    "block_size": st.sampled_from([None, 16, 32]),
    "symmetric": st.sampled_from([None, True, False]),
    "round_method": st.sampled_from([None, *RoundType]),
    "scale_type": st.sampled_from([None, *ScaleType]),
    "zero_point_type": st.sampled_from([None, *ZeroPointType]),
    "scale_format": st.sampled_from([None, "e8m0", "float32"]),
    "scale_calculation_mode": st.sampled_from([None, "even", "floor", "ceil"]),
    "mx_element_dtype": st.sampled_from([None, *MX_ELEMENT_DTYPES]),
    "observer_cls": st.sampled_from([None, "PerTensorMinMaxObserver", "PerGroupMinMaxObserver",
                                     "PerBlockMXObserver", "PlaceholderObserver"]),
    "is_scale_quant": st.booleans(),
    "enable_buffer_reuse": st.booleans(),
    "max_input_numel": st.sampled_from([None, 1, 4 * 1024 * 1024]),
}


@st.composite
def spec_fields(draw: st.DrawFn) -> dict[str, object]:
    """Random field values: mostly plausible, some of any type or absurd size."""
    fields: dict[str, object] = {"dtype": draw(_GOOD_VALUES["dtype"])}
    for key in SPEC_KEYS:
        if key == "dtype" or not draw(st.booleans()):
            continue
        fields[key] = draw(st.one_of(_GOOD_VALUES[key], _ANY_VALUE) if draw(st.integers(0, 4)) == 0
                           else _GOOD_VALUES[key])
    return fields


def check_spec_construction(fields: dict[str, object]) -> None:
    try:
        spec = QuantizationSpec(**fields)  # type: ignore[arg-type]
    except ValueError as e:
        message = str(e)
        assert message.startswith("QuantizationSpec"), message
        assert any(key in message for key in SPEC_KEYS), f"no field named in: {message}"
        assert len(message) < 1000, "message too long (a huge value must be cut short)"
        return
    assert QuantizationSpec.from_dict(spec.to_dict()) == spec


def test_spec_construction_property() -> None:
    _run(check_spec_construction, spec_fields(), DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_spec_construction_property_slow() -> None:
    _run(check_spec_construction, spec_fields(), SPEC_SLOW_EXAMPLES)
