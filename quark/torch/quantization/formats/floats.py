"""Low-precision float element formats: FP8 (E4M3, E5M2), FP6 (E3M2, E2M3) and FP4 (E2M1).

References:
- FP8: OCP 8-bit Floating Point Specification (OFP8) rev 1.0, 2023-06-20. E4M3 is the "fn"
  variant (bias 7, no infinities, S.1111.111 is NaN, max 448); E5M2 is IEEE-like (bias 15,
  infinities and NaNs, max 57344). Our results equal ``torch.float8_e4m3fn`` /
  ``torch.float8_e5m2`` casts of the saturated value.
- FP6 / FP4: OCP Microscaling Formats (MX) Specification v1.0, 2023-09, section 5.3.
  E3M2 (bias 3, max 28), E2M3 (bias 1, max 7.5), E2M1 (bias 1, max 6); none has Inf or NaN codes,
  all have subnormals (exponent field 0) and a signed zero.

Bit patterns (``float_to_code`` / ``code_to_float``): sign in the top bit of the 8/6/4-bit code,
then the biased exponent, then the mantissa; a code sits in the low bits of a ``uint8``.

Rounding is round-to-nearest-even onto the format's grid after saturating to ``+-max``.
NaN stays NaN in :func:`round_to_float_grid`; FP6/FP4 codes cannot hold NaN, so encoding one raises.
"""

from __future__ import annotations

import functools

import torch

from quark.torch.quantization.config.type import Dtype
from quark.torch.quantization.formats._common import exp2_int, floor_log2, info_of_kind
from quark.torch.quantization.formats.table import FormatInfo

__all__ = ["FLOAT_ELEMENT_DTYPES", "code_to_float", "float_info", "float_to_code",
           "round_to_float_grid"]

FLOAT_ELEMENT_DTYPES: tuple[Dtype, ...] = (
    Dtype.fp8_e4m3, Dtype.fp8_e5m2, Dtype.fp6_e3m2, Dtype.fp6_e2m3, Dtype.fp4,
)


def float_info(dtype: Dtype | str, owner: str = "formats") -> FormatInfo:
    """Table row of a low-precision float element dtype (``ValueError`` for any other dtype)."""
    return info_of_kind(dtype, ("float",), owner)


def _emin(info: FormatInfo) -> int:
    """Exponent of the smallest normal power of two."""
    return 1 - info.exp_bias


def _round_grid_f32(v: torch.Tensor, info: FormatInfo) -> torch.Tensor:
    """Saturating round-to-nearest-even of float32 ``v`` onto ``info``'s grid (float32 out)."""
    v = v.clamp(-info.qmax, info.qmax)  # NaN passes through clamp
    a = v.abs()
    # The quantum (spacing of representable values) in a's binade; subnormals share emin's quantum.
    exp = floor_log2(a).clamp(min=_emin(info))
    q_exp = exp - info.mbits
    r = torch.round(a * exp2_int(-q_exp)) * exp2_int(q_exp)
    return torch.copysign(r, v)


def round_to_float_grid(x: torch.Tensor, dtype: Dtype | str) -> torch.Tensor:
    """Round ``x`` to the nearest value of an FP8/FP6/FP4 format, saturating; same dtype as ``x``.

    For FP8 this equals ``x.clamp(-max, max).to(torch.float8_*).to(x.dtype)`` for every float32
    value (ties to even, subnormals, signed zero, NaN kept). Computation is in float32.
    """
    info = float_info(dtype, "formats.round_to_float_grid")
    return _round_grid_f32(x.float(), info).to(x.dtype)


def float_to_code(values: torch.Tensor, dtype: Dtype | str) -> torch.Tensor:
    """Bit patterns (``uint8``) of ``values`` rounded (saturating, nearest-even) to ``dtype``.

    FP8 codes are the bytes of ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``. FP6/FP4 codes use
    the low 6/4 bits; since these formats have no NaN, a NaN input raises ``ValueError``.
    """
    info = float_info(dtype, "formats.float_to_code")
    v = values.float()
    if info.torch_dtype is not None:
        return v.clamp(-info.qmax, info.qmax).to(info.torch_dtype).view(torch.uint8)
    if torch.isnan(v).any():
        raise ValueError(f"formats.float_to_code: {info.dtype.name} has no NaN code, but the input "
                         f"contains NaN")
    r = _round_grid_f32(v, info)
    a = r.abs()
    emin = _emin(info)
    sub = a < 2.0 ** emin
    exp = floor_log2(a).clamp(min=emin)
    # Mantissa field: a / quantum minus the implicit leading one for normals (exact integers).
    scaled = a * exp2_int(info.mbits - exp)
    mant = torch.where(sub, scaled, scaled - 2**info.mbits).to(torch.int32)
    e_field = torch.where(sub, torch.zeros_like(exp), exp + info.exp_bias)
    sign = torch.signbit(r).to(torch.int32)
    code = (sign << (info.bits - 1)) | (e_field << info.mbits) | mant
    return code.to(torch.uint8)


@functools.cache
def _decode_table(dtype: Dtype) -> torch.Tensor:
    """All ``2**bits`` values of a small float format, indexed by code (float32, CPU)."""
    info = float_info(dtype)
    values = []
    for code in range(2**info.bits):
        sign = -1.0 if code >> (info.bits - 1) else 1.0
        e_field = (code >> info.mbits) & ((1 << info.ebits) - 1)
        mant = code & ((1 << info.mbits) - 1)
        if e_field == 0:
            mag = mant * 2.0 ** (_emin(info) - info.mbits)
        else:
            mag = (1.0 + mant / 2**info.mbits) * 2.0 ** (e_field - info.exp_bias)
        values.append(sign * mag)
    return torch.tensor(values, dtype=torch.float32)


def code_to_float(codes: torch.Tensor, dtype: Dtype | str) -> torch.Tensor:
    """Values (float32) of FP8/FP6/FP4 bit patterns; FP8 codes may also be float8 tensors.

    FP6/FP4 codes must fit their 6/4 bits (``ValueError`` otherwise).
    """
    info = float_info(dtype, "formats.code_to_float")
    if info.torch_dtype is not None:
        if codes.dtype == info.torch_dtype:
            return codes.float()
        return codes.to(torch.uint8).view(info.torch_dtype).float()
    if codes.is_floating_point():
        raise ValueError(f"formats.code_to_float: {info.dtype.name} codes must be an integer tensor, "
                         f"got {codes.dtype}")
    idx = codes.to(torch.int64)
    if ((idx < 0) | (idx >= 2**info.bits)).any():
        raise ValueError(f"formats.code_to_float: {info.dtype.name} codes must lie in "
                         f"[0, {2**info.bits - 1}]")
    return _decode_table(info.dtype).to(codes.device)[idx]
