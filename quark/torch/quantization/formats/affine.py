"""Scaled formats: affine integers, scaled low-precision floats and plain casts.

One ``quantize`` / ``dequantize`` / ``fake_quantize`` triple covers every dtype whose
quantization parameters come from an observer (``scale``, optional ``zero_point``):

- integers (``int8``, ``uint8``, ``int4``, ``uint4``, ``int2``; two's complement / unsigned):
  ``q = clamp(rnd(x * (1 / scale)) + zp, qmin, qmax)``, dequantized as ``(q - zp) * scale``.
  Codes are one per element: ``int8`` for signed dtypes, ``uint8`` for unsigned ones.
  ``zero_point`` is expected to hold integer values (an int tensor or integral floats).
  ``x * (1 / scale)`` (the float32 reciprocal, then a multiply) is the arithmetic of amd-quark 0.13
  and of ``torch.fake_quantize_per_*_affine``, so the same scales give the same codes and
  checkpoints; it rounds differently from the correctly rounded ``x / scale`` where ``x / scale``
  sits within an ulp of a tie (e.g. ``+-7.5`` for int4, about 0.5% of int4 weights).
  :func:`set_integer_division` (or the :func:`integer_division` context manager) selects
  ``"exact"`` (IEEE ``x / scale``) instead, for every integer path (fake, real, algorithms).
- FP8 (OCP OFP8 rev 1.0): ``x / scale`` saturated to ``+-max`` then cast; codes are
  ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` tensors.
- FP6 / FP4 (OCP MX v1.0 section 5.3): ``x / scale`` rounded to nearest even on the grid,
  saturating; codes are ``uint8`` bit patterns (see :mod:`.floats`).
- ``float16`` / ``bfloat16``: a plain cast, ``scale`` and ``zero_point`` ignored.

Scale and zero point have the canonical parameter shape of :mod:`.granularity`. All arithmetic
runs in float32 so ``fake_quantize(x)`` equals ``dequantize(quantize(x))`` bit for bit. A NaN or
Inf scale or zero point raises ``ValueError`` naming it. A zero scale is divided as the smallest
normal float32 instead (codes saturate) and multiplies back to zero, so an all-zero channel with
a zero scale stays zero instead of turning into NaN.
Block formats (``mx``, ``mx6``, ``mx9``, ``bfp16``) live in :mod:`.mx` and :mod:`.bfp`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType
from quark.torch.quantization.formats._common import as_dtype, round_values
from quark.torch.quantization.formats.floats import _round_grid_f32, code_to_float, float_to_code
from quark.torch.quantization.formats.granularity import broadcast_param, group_param, grouped_view
from quark.torch.quantization.formats.table import FORMATS, FormatInfo

__all__ = ["INTEGER_DIVISIONS", "dequantize", "divide_by_scale", "fake_quantize", "fake_quantize_broadcast",
           "get_integer_division", "integer_division", "quantize", "set_integer_division"]

_TINY = torch.finfo(torch.float32).tiny
_F32_MAX = torch.finfo(torch.float32).max
# How integer codes divide by their scale: "reciprocal" = x * (1 / s) (amd-quark 0.13, torch's
# fake_quantize_per_*_affine), "exact" = x / s (IEEE division, correctly rounded).
INTEGER_DIVISIONS = ("reciprocal", "exact")
_INTEGER_DIVISION = ["reciprocal"]


def _check_division(mode: object, owner: str) -> str:
    if mode not in INTEGER_DIVISIONS:
        raise ValueError(f"{owner}: integer division mode={mode!r} is not one of: {', '.join(INTEGER_DIVISIONS)}")
    return mode  # type: ignore[return-value]


def get_integer_division() -> str:
    """The process-wide integer division mode (``"reciprocal"`` unless changed)."""
    return _INTEGER_DIVISION[0]


def set_integer_division(mode: str) -> str:
    """Select how integer quantization divides by the scale; returns the previous mode.

    ``"reciprocal"`` (default): ``x * (1 / scale)``, bit-identical to amd-quark 0.13.
    ``"exact"``: ``x / scale``, correctly rounded. Applies to fake and real quantization and to
    the algorithms' searches alike, so a model must be quantized and frozen under one mode.
    """
    previous = _INTEGER_DIVISION[0]
    _INTEGER_DIVISION[0] = _check_division(mode, "formats.set_integer_division")
    return previous


@contextmanager
def integer_division(mode: str) -> Iterator[None]:
    """Run a block with another integer division mode (see :func:`set_integer_division`)."""
    previous = set_integer_division(mode)
    try:
        yield
    finally:
        _INTEGER_DIVISION[0] = previous


def divide_by_scale(x: torch.Tensor, scale: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """``x`` over a positive ``scale`` before integer rounding, in the selected division mode."""
    mode = _check_division(mode or _INTEGER_DIVISION[0], "formats.divide_by_scale")
    if mode == "exact":
        return x / scale
    return x * torch.reciprocal(scale)


def _scaled_info(dtype: Dtype | str, owner: str) -> FormatInfo:
    info = FORMATS[as_dtype(dtype, owner)]
    if info.kind not in ("int", "float", "cast"):
        allowed = ", ".join(d.name for d, f in FORMATS.items() if f.kind in ("int", "float", "cast"))
        raise ValueError(f"{owner}: dtype={info.dtype.name} is a block format; use "
                         f"mx_quantize/bfp_quantize (or their fake variants). Scaled dtypes: {allowed}")
    return info


def _check_finite_param(param: torch.Tensor, name: str, owner: str) -> None:
    """A NaN/Inf scale or zero point (also one past float32's range) would turn every code it
    covers into NaN or saturate it; refuse it naming the parameter."""
    if param.is_floating_point() and not bool(torch.isfinite(param.float()).all()):
        n_bad = int((~torch.isfinite(param.float())).sum())
        raise ValueError(f"{owner}: {name} of shape {tuple(param.shape)} holds {n_bad} NaN/Inf value(s) "
                         f"(or values beyond float32); a {name} must be finite")


def _check_grid_reach(scale: torch.Tensor, zero_point: torch.Tensor | None, info: FormatInfo, owner: str) -> None:
    """Refuse a scale whose grid reaches past float32 (its extreme codes would dequantize to Inf):
    a range near float32's max rounded up to a power of two, or ``qmin * scale`` of a symmetric one."""
    s = scale.detach().double().abs()
    if info.kind == "int":
        z = torch.zeros_like(s) if zero_point is None else zero_point.detach().to(s.device).double()
        reach = torch.maximum((info.qmax - z).abs(), (info.qmin - z).abs()) * s
    else:
        reach = info.qmax * s
    if bool((reach > _F32_MAX).any()):
        raise ValueError(f"{owner}: scale of shape {tuple(scale.shape)} reaches {float(reach.max()):.4g} at the "
                         f"extreme codes of {info.dtype.name}, beyond float32's range ({_F32_MAX:.4g}); "
                         "the tensor's range is too close to float32's maximum to quantize")


def _params(x_shape: torch.Size, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
            qscheme: QSchemeType | str, ch_axis: int | None, group_size: int | None,
            owner: str, device: torch.device, info: FormatInfo,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """(scale to divide by, scale to multiply by, zero point, shape): float32 parameters that broadcast against
    the tensor viewed as ``shape``. Groups that tile their axis are views ``[..., groups, group, ...]`` with each
    group's parameter once (:func:`grouped_view`), not copied to every element; other granularities broadcast to
    ``x_shape`` itself. Every element meets the same parameter values either way."""
    if scale is None:
        raise ValueError(f"{owner}: scale is required for integer and scaled float dtypes")
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(scale)
    _check_finite_param(scale, "scale", owner)
    if zero_point is not None:
        if not isinstance(zero_point, torch.Tensor):
            zero_point = torch.tensor(zero_point)
        _check_finite_param(zero_point, "zero_point", owner)
    grouped = grouped_view(x_shape, qscheme, ch_axis, group_size)
    shape = tuple(int(n) for n in x_shape) if grouped is None else grouped[0]

    def place(p: torch.Tensor) -> torch.Tensor:
        p = p.to(device=device, dtype=torch.float32)
        if grouped is None:
            return broadcast_param(p, x_shape, qscheme, ch_axis, group_size)
        return group_param(p, x_shape, ch_axis, group_size)

    s = place(scale)
    s_div = torch.where(s == 0, torch.full_like(s, _TINY), s)
    zp = None if zero_point is None else place(zero_point)
    _check_grid_reach(scale, zero_point, info, owner)
    return s_div, s, zp, shape


def _int_levels(xf: torch.Tensor, s_div: torch.Tensor, zp: torch.Tensor | None, info: FormatInfo,
                round_method: RoundType | str) -> torch.Tensor:
    """Integer-valued float32 codes ``clamp(rnd(x * (1 / s)) + zp, qmin, qmax)`` (see :func:`divide_by_scale`)."""
    v = round_values(divide_by_scale(xf, s_div), round_method)
    if zp is not None:
        v = v + zp
    # ``+ 0.0`` turns -0.0 into +0.0: integer codes have no signed zero, and the fake path must
    # match the round trip bit for bit.
    return v.clamp(info.qmin, info.qmax) + 0.0


def quantize(x: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
             dtype: Dtype | str, *, qscheme: QSchemeType | str, ch_axis: int | None = None,
             group_size: int | None = None,
             round_method: RoundType | str = RoundType.half_even) -> torch.Tensor:
    """Quantize ``x`` to real codes of ``dtype`` (see the module docstring for each family).

    ``round_method`` applies to integers; floats always round to nearest even. NaN cannot be
    encoded in integer or FP6/FP4 codes and raises ``ValueError``.
    """
    owner = "formats.quantize"
    info = _scaled_info(dtype, owner)
    if info.kind == "cast":
        return x.to(info.torch_dtype)
    s_div, _, zp, shape = _params(x.shape, scale, zero_point, qscheme, ch_axis, group_size, owner, x.device, info)

    def codes(part: torch.Tensor, part_s_div: torch.Tensor, part_zp: torch.Tensor | None) -> torch.Tensor:
        xf = part.float()
        if info.kind == "int":
            levels = _int_levels(xf, part_s_div, part_zp, info, round_method)
            if torch.isnan(levels).any():
                raise ValueError(f"{owner}: the input contains NaN, which {info.dtype.name} cannot encode")
            return levels.to(torch.int8 if info.signed else torch.uint8)
        v = xf / part_s_div
        if info.torch_dtype is not None:  # fp8
            return v.clamp(-info.qmax, info.qmax).to(info.torch_dtype)
        return float_to_code(v, info.dtype)

    return _by_leading_rows(codes, x.reshape(shape), [s_div, zp]).reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
               dtype: Dtype | str, *, qscheme: QSchemeType | str, ch_axis: int | None = None,
               group_size: int | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of codes ``q``: integers ``(q - zp) * scale``, floats ``value(q) * scale``."""
    owner = "formats.dequantize"
    info = _scaled_info(dtype, owner)
    if info.kind == "cast":
        return q.to(out_dtype)
    _, s, zp, shape = _params(q.shape, scale, zero_point, qscheme, ch_axis, group_size, owner, q.device, info)
    if info.kind == "int":
        v = q.float().reshape(shape)
        if zp is not None:
            v = v - zp
        return (v * s).to(out_dtype).reshape(q.shape)
    return (code_to_float(q, info.dtype).reshape(shape) * s).to(out_dtype).reshape(q.shape)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                  dtype: Dtype | str, *, qscheme: QSchemeType | str, ch_axis: int | None = None,
                  group_size: int | None = None,
                  round_method: RoundType | str = RoundType.half_even) -> torch.Tensor:
    """``dequantize(quantize(x))`` computed without codes, in ``x``'s dtype.

    Bit-identical to the round trip in float32; NaN inputs stay NaN here (the round trip raises).
    """
    owner = "formats.fake_quantize"
    info = _scaled_info(dtype, owner)
    if info.kind == "cast":
        return x.to(info.torch_dtype).to(x.dtype)
    s_div, s, zp, shape = _params(x.shape, scale, zero_point, qscheme, ch_axis, group_size, owner, x.device, info)

    def fake(part: torch.Tensor, part_s_div: torch.Tensor, part_s: torch.Tensor,
             part_zp: torch.Tensor | None) -> torch.Tensor:
        return _fake_quantize_with(part, part_s_div, part_s, part_zp, info, round_method)

    return _by_leading_rows(fake, x.reshape(shape), [s_div, s, zp]).reshape(x.shape)


#: Elements :func:`quantize` and :func:`fake_quantize` take through their float32 arithmetic at a time (rows of
#: the tensor's leading dimension): each float32 temporary of a step is at most 64 MiB instead of four bytes per
#: element of the whole tensor (freezing a Llama-3-70B gate_proj, 235M elements, took 3.6 GB of host memory
#: beside its 0.47 GB bf16 weight). Every element's arithmetic is the same either way.
CHUNK_ELEMENTS = 1 << 24

#: The same on the CPU, where a step's temporaries (4 MiB each) then stay in the caches: the int4 g128 codes of
#: Llama-3-8B's down_proj weight take 0.42-0.48 s at ``1 << 24`` and 0.08-0.12 s at ``1 << 20`` on a 2-core x86-64
#: CPU (``bench/bench_formats.py``, four runs; ``1 << 18`` is within the runs' noise of ``1 << 20``).
CPU_CHUNK_ELEMENTS = 1 << 20


def _by_leading_rows(fn: Callable[..., torch.Tensor], x: torch.Tensor,
                     params: list[torch.Tensor | None]) -> torch.Tensor:
    """``fn(x, *params)``, computed ``CHUNK_ELEMENTS`` (CPU: ``CPU_CHUNK_ELEMENTS``) at a time along ``x``'s first
    dimension into one output. ``params`` broadcast against ``x``: one with ``x``'s dimensions and a first
    dimension above 1 is sliced with it, the others serve every slice. A tensor that needs its gradient runs
    whole (no in-place assembly)."""
    rows = x.shape[0] if x.dim() else 1
    chunk = CHUNK_ELEMENTS if x.device.type != "cpu" else min(CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS)
    step = max(1, chunk // max(x[0].numel() if x.dim() else 1, 1))
    if step >= rows or (x.requires_grad and torch.is_grad_enabled()):
        return fn(x, *params)

    def rows_of(p: torch.Tensor | None, r0: int) -> torch.Tensor | None:
        return p if p is None or p.dim() < x.dim() or p.shape[0] == 1 else p[r0:r0 + step]

    out: torch.Tensor | None = None
    for r0 in range(0, rows, step):
        part = fn(x[r0:r0 + step], *(rows_of(p, r0) for p in params))
        if out is None:
            out = torch.empty(x.shape, dtype=part.dtype, device=part.device)
        out[r0:r0 + step] = part
    assert out is not None
    return out


def fake_quantize_broadcast(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                            dtype: Dtype | str, *,
                            round_method: RoundType | str = RoundType.half_even) -> torch.Tensor:
    """``fake_quantize`` with ``scale``/``zero_point`` already broadcastable to ``x``.

    For callers that hold parameters in their own layout (the algorithms' searches quantize one
    column or a stack of groups at a time); no granularity check, the same float32 arithmetic.
    """
    info = _scaled_info(dtype, "formats.fake_quantize_broadcast")
    if info.kind == "cast":
        return x.to(info.torch_dtype).to(x.dtype)
    s = scale.to(device=x.device, dtype=torch.float32)
    s_div = torch.where(s == 0, torch.full_like(s, _TINY), s)
    zp = None if zero_point is None else zero_point.to(device=x.device, dtype=torch.float32)
    return _fake_quantize_with(x, s_div, s, zp, info, round_method)


def _fake_quantize_with(x: torch.Tensor, s_div: torch.Tensor, s: torch.Tensor, zp: torch.Tensor | None,
                        info: FormatInfo, round_method: RoundType | str) -> torch.Tensor:
    xf = x.float()
    if info.kind == "int":
        levels = _int_levels(xf, s_div, zp, info, round_method)
        if zp is not None:
            levels = levels - zp
        return (levels * s).to(x.dtype)
    v = xf / s_div
    if info.torch_dtype is not None:  # fp8: the native cast is the reference
        g = v.clamp(-info.qmax, info.qmax).to(info.torch_dtype).float()
    else:
        g = _round_grid_f32(v, info)
    return (g * s).to(x.dtype)
