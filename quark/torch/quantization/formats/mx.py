"""OCP Microscaling (MX) block formats: a shared E8M0 scale per block of elements.

Reference: OCP Microscaling Formats (MX) Specification v1.0, 2023-09. Section 5: a block of
``k = 32`` elements shares one scale ``X = 2^e`` stored as E8M0 (an 8-bit biased exponent, bias
127, ``0xFF`` = NaN, no zero or sign). Element formats (``MX_ELEMENT_DTYPES``): FP8 E4M3/E5M2,
FP6 E3M2/E2M3, FP4 E2M1 and INT8 (MXINT8: 8-bit two's complement with an implicit scale
``2^-6``). Section 6.3 (conversion from a vector of floats)::

    shared_exp = floor(log2(max_i |V_i|)) - emax_elem      (clamped to the E8M0 range)
    P_i = quantize_to_element_format(V_i / 2^shared_exp)    (saturating at the element's max)

Choices where the spec leaves room (documented here so every caller sees one answer):

- A block of zeros gets ``shared_exp = -127`` (E8M0 code 0) and zero elements.
- A block holding NaN or +-Inf gets E8M0 ``0xFF`` (NaN): the whole block decodes as NaN. (The
  amd/Quark reference lets Inf saturate instead.)
- MXINT8 elements use the symmetric range ``[-127, 127]`` (``-128`` unused), as amd/Quark does.
- ``scale_mode`` picks how ``log2(amax)`` is rounded: ``"floor"`` (the spec, default),
  ``"ceil"``, or ``"even"`` (amd/Quark's default ``scale_calculation_mode``: round ``amax`` to the
  element's precision first, so a block whose max would round past the element max moves up an
  exponent instead of saturating). Under ``"ceil"`` and ``"even"`` a block max above ``2^127``
  keeps the floor exponent: rounding up would decode the block past float32's range.
- A last partial block along the axis is a block of its real elements (the spec has ``k = 32``
  blocks only; we allow any ``block_size`` and any length).
"""

from __future__ import annotations

import torch

from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.formats._common import exp2_int, floor_log2, info_of_kind
from quark.torch.quantization.formats.floats import _round_grid_f32, code_to_float, float_to_code
from quark.torch.quantization.formats.granularity import broadcast_param, normalize_axis, reduce_amax
from quark.torch.quantization.formats.table import MX_ELEMENT_DTYPES, FormatInfo

__all__ = ["E8M0_NAN", "MX_SCALE_MODES", "e8m0_to_float", "float_to_e8m0", "mx_dequantize",
           "mx_fake_quantize", "mx_quantize", "mx_shared_exponent"]

E8M0_NAN = 0xFF
E8M0_BIAS = 127
MX_SCALE_MODES = ("floor", "ceil", "even")
_MXINT8_FRAC_BITS = 6  # MXINT8 element value = int8 * 2^-6
_MXINT8_MAX = 127


def _element_info(element_dtype: Dtype | str, owner: str) -> FormatInfo:
    return info_of_kind(element_dtype, (), owner, allowed=MX_ELEMENT_DTYPES)


def _check_block(block_size: int, owner: str) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{owner}.block_size={block_size!r} must be a positive int (OCP MX uses 32)")
    return block_size


def _emax(info: FormatInfo) -> int:
    return 0 if info.kind == "int" else info.emax


def _mbits(info: FormatInfo) -> int:
    return _MXINT8_FRAC_BITS if info.kind == "int" else info.mbits


def e8m0_to_float(u8: torch.Tensor) -> torch.Tensor:
    """Scales ``2^(code - 127)`` (float32, exact, ``2^-127`` as a subnormal) of E8M0 codes; 0xFF -> NaN."""
    code = u8.to(torch.int32)
    out = exp2_int(code - E8M0_BIAS)
    return torch.where(code == E8M0_NAN, torch.full_like(out, float("nan")), out)


def float_to_e8m0(pow2_scale: torch.Tensor) -> torch.Tensor:
    """E8M0 codes (uint8) of power-of-two scales.

    A value that is not a power of two is rounded down to one; values are clamped to the E8M0
    range ``[2^-127, 2^127]`` (so zero gives code 0); NaN and Inf give ``0xFF``.
    """
    s = pow2_scale.float()
    e = floor_log2(s).clamp(-E8M0_BIAS, E8M0_BIAS)
    e = torch.where(s > 0, e, torch.full_like(e, -E8M0_BIAS))
    code = e + E8M0_BIAS
    code = torch.where(torch.isfinite(s), code, torch.full_like(code, E8M0_NAN))
    return code.to(torch.uint8)


def mx_shared_exponent(amax: torch.Tensor, element_dtype: Dtype | str,
                       scale_mode: str = "floor") -> torch.Tensor:
    """E8M0 codes (uint8) of the shared scale for blocks with absolute maxima ``amax``."""
    owner = "formats.mx_shared_exponent"
    info = _element_info(element_dtype, owner)
    if scale_mode not in MX_SCALE_MODES:
        raise ValueError(f"{owner}.scale_mode={scale_mode!r} is not one of: {', '.join(MX_SCALE_MODES)}")
    a = amax.float()
    finite = torch.isfinite(a)
    a = torch.where(finite, a, torch.zeros_like(a))
    e = floor_log2(a)
    if scale_mode != "floor":
        mant, _ = torch.frexp(a)  # a = mant * 2^(e + 1), mant in [0.5, 1)
        if scale_mode == "ceil":
            up = mant != 0.5
        else:
            # Round amax to the element's mantissa precision: up when 2*mant >= 2 - 2^-(mbits+1).
            up = 2 * mant >= 2 - 2.0 ** -(_mbits(info) + 1)
        # A block max above 2^127 keeps floor's exponent: rounding it up to 2^128 would decode the
        # block past float32's range (Inf) instead of saturating at the element maximum.
        e = (e + up.to(e.dtype)).clamp(max=E8M0_BIAS)
    shared = (e - _emax(info)).clamp(-E8M0_BIAS, E8M0_BIAS)
    shared = torch.where(a > 0, shared, torch.full_like(shared, -E8M0_BIAS))
    code = torch.where(finite, shared + E8M0_BIAS, torch.full_like(shared, E8M0_NAN))
    return code.to(torch.uint8)


def _scales(x: torch.Tensor, info: FormatInfo, axis: int, block_size: int,
            scale_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(E8M0 codes in param shape, float32 scales broadcast to x's shape)."""
    amax = reduce_amax(x, QSchemeType.per_group, axis, block_size)
    code = mx_shared_exponent(amax, info.dtype, scale_mode)
    scale = broadcast_param(e8m0_to_float(code), x.shape, QSchemeType.per_group, axis, block_size)
    return code, scale


def _element_grid(v: torch.Tensor, info: FormatInfo) -> torch.Tensor:
    """Element values (float32) of ``v = x / scale`` in the element format."""
    if info.kind == "int":
        m = torch.round(v * 2.0**_MXINT8_FRAC_BITS).clamp(-_MXINT8_MAX, _MXINT8_MAX) + 0.0
        return m * 2.0**-_MXINT8_FRAC_BITS  # (+ 0.0: int8 codes have no -0)
    if info.torch_dtype is not None:
        return v.clamp(-info.qmax, info.qmax).to(info.torch_dtype).float()
    return _round_grid_f32(v, info)


def mx_quantize(x: torch.Tensor, element_dtype: Dtype | str, *, axis: int = -1, block_size: int = 32,
                scale_mode: str = "floor") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to OCP MX: ``(element codes, E8M0 scale codes)``.

    Element codes have ``x``'s shape: float8 tensors for FP8, ``uint8`` bit patterns for FP6/FP4,
    ``int8`` for MXINT8. Scale codes are ``uint8`` with the per_group parameter shape along
    ``axis`` (``ceil(n / block_size)`` blocks). Elements of a NaN block are stored as zero codes.
    """
    owner = "formats.mx_quantize"
    info = _element_info(element_dtype, owner)
    _check_block(block_size, owner)
    normalize_axis(axis, x.ndim, owner, "axis")
    xf = x.float()
    code, scale = _scales(xf, info, axis, block_size, scale_mode)
    v = xf / scale
    if info.kind == "int":
        v = torch.nan_to_num(v, nan=0.0)  # only elements of NaN blocks are NaN here
        m = torch.round(v * 2.0**_MXINT8_FRAC_BITS).clamp(-_MXINT8_MAX, _MXINT8_MAX)
        return m.to(torch.int8), code
    if info.torch_dtype is not None:  # fp8 (NaN blocks keep NaN codes; the scale is NaN anyway)
        return v.clamp(-info.qmax, info.qmax).to(info.torch_dtype), code
    return float_to_code(torch.nan_to_num(v, nan=0.0), info.dtype), code


def mx_dequantize(codes: torch.Tensor, scale_e8m0: torch.Tensor, element_dtype: Dtype | str, *,
                  axis: int = -1, block_size: int = 32,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of MX element codes times their block's E8M0 scale."""
    owner = "formats.mx_dequantize"
    info = _element_info(element_dtype, owner)
    _check_block(block_size, owner)
    normalize_axis(axis, codes.ndim, owner, "axis")
    if info.kind == "int":
        elements = codes.float() * 2.0**-_MXINT8_FRAC_BITS
    else:
        elements = code_to_float(codes, info.dtype)
    scale = broadcast_param(e8m0_to_float(scale_e8m0.to(codes.device)), codes.shape,
                            QSchemeType.per_group, axis, block_size)
    return (elements * scale).to(out_dtype)


def mx_fake_quantize(x: torch.Tensor, element_dtype: Dtype | str, *, axis: int = -1,
                     block_size: int = 32, scale_mode: str = "floor") -> torch.Tensor:
    """``mx_dequantize(mx_quantize(x))`` computed directly, in ``x``'s dtype (bit-identical)."""
    owner = "formats.mx_fake_quantize"
    info = _element_info(element_dtype, owner)
    _check_block(block_size, owner)
    normalize_axis(axis, x.ndim, owner, "axis")
    xf = x.float()
    _, scale = _scales(xf, info, axis, block_size, scale_mode)
    return (_element_grid(xf / scale, info) * scale).to(x.dtype)
