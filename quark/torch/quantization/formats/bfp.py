"""Block floating point: BFP16 and the shared-microexponent formats MX6 / MX9.

References:
- MX6 / MX9: Rouhani et al., "With Shared Microexponents, A Little Shifting Goes a Long Way",
  ISCA 2023. A block of 16 elements shares an 8-bit exponent; each sub-block of 2 shares a 1-bit
  micro-exponent; each element is sign + m-bit magnitude (MX9: m = 7, MX6: m = 4), so
  ``(8 + 8 * 1 + 16 * (1 + m)) / 16`` = 9 or 6 bits per element.
- BFP16: block floating point with an 8-bit shared exponent per block of 8 elements and an
  8-bit two's complement mantissa per element (no micro-exponents).

Conversion (per block of ``block_size`` along ``axis``):

- ``E = floor(log2(max |x|))`` over the block, clamped to ``[-127, 127]`` (stored biased by 127).
- MX6/MX9: a pair's micro-exponent ``mu`` is 1 when both of its elements are below ``2^E``
  (``max |x_pair| < 2^E``), else 0.
- Element mantissa ``M = clamp(round_half_even(x / 2^(E - mu - (m - 1))), lo, 2^m - 1)``, value
  ``M * 2^(E - mu - (m - 1))``, with ``lo = -(2^m - 1)`` for MX6/MX9 (sign + m-bit magnitude) and
  ``lo = -2^7`` for BFP16 (an int8 mantissa). The block's largest element uses the full m bits.
- BFP16 only: if rounding pushes a mantissa past ``+127`` (a positive value within half a step of
  ``2^(E+1)``), the block's exponent goes up by one and the block is re-rounded; a negative one
  rounding to ``-128`` stays (it fits the int8 mantissa). MX6/MX9 saturate instead.
- A block of zeros stores ``E = -127`` (code 0); a block with NaN or +-Inf stores code 255 and
  decodes as all NaN.

These are the arithmetic of amd-quark 0.13 (``fake_quantize_mx6_mx9`` / ``fake_quantize_bfp16``),
so finite inputs give bit-identical values. Deliberate differences: non-finite values poison their
block (Quark zeroes them and saturates), inputs below ``2^-127`` keep the clamped exponent (Quark
flushes float32 subnormals in MX6/MX9), and a BFP16 block at the top exponent (``|x| >= 2^127``)
saturates at mantissa -127, where -128 would decode to -Inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.formats._common import exp2_int, floor_log2, info_of_kind
from quark.torch.quantization.formats.granularity import (
    broadcast_param,
    normalize_axis,
    param_shape,
    reduce_amax,
    reduce_minmax,
)
from quark.torch.quantization.formats.table import FormatInfo

__all__ = ["BfpTensor", "bfp_dequantize", "bfp_fake_quantize", "bfp_quantize"]

_BIAS = 127
_NAN_CODE = 255
_PG = QSchemeType.per_group


@dataclass(frozen=True)
class BfpTensor:
    """Real storage of a BFP16 / MX6 / MX9 tensor.

    ``mantissa``: int8, ``x``'s shape: values in ``[-(2^m - 1), 2^m - 1]`` (MX6/MX9) or
    ``[-128, 127]`` (BFP16).
    ``shared_exp``: uint8 biased exponent (bias 127, 255 = NaN block), per_group shape along the
    axis with the block size. ``micro_exp``: uint8 0/1 per pair of elements (per_group shape with
    group 2), or ``None`` for BFP16.
    """

    mantissa: torch.Tensor
    shared_exp: torch.Tensor
    micro_exp: torch.Tensor | None


def _info(dtype: Dtype | str, owner: str) -> FormatInfo:
    return info_of_kind(dtype, ("bfp",), owner)


def _block(info: FormatInfo, block_size: int | None, owner: str) -> int:
    b = info.block_size if block_size is None else block_size
    if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
        raise ValueError(f"{owner}.block_size={block_size!r} must be a positive int "
                         f"(default for {info.dtype.name}: {info.block_size})")
    sub = info.sub_block_size
    if sub is not None and b % sub:
        raise ValueError(f"{owner}.block_size={b} must be a multiple of the {info.dtype.name} "
                         f"micro-exponent sub-block size {sub}")
    return b


def _quantize_core(x: torch.Tensor, info: FormatInfo, axis: int, block: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(integer-valued float mantissas, shared codes, micro exps or None, element scales), x-shaped
    mantissas/scales; NaN blocks have zero mantissas and NaN scales."""
    xf = x.float()
    mmax = 2**info.mbits - 1
    amax = reduce_amax(xf, _PG, axis, block)
    finite = torch.isfinite(amax)
    amax = torch.where(finite, amax, torch.zeros_like(amax))
    e = torch.where(amax > 0, floor_log2(amax), torch.full_like(amax, -_BIAS, dtype=torch.int32))
    e = e.clamp(-_BIAS, _BIAS)
    xz = torch.where(torch.isfinite(xf), xf, torch.zeros_like(xf))

    micro = None
    sub = info.sub_block_size
    if sub is not None:
        pair_amax = reduce_amax(xz, _PG, axis, sub)
        e_pairs = broadcast_param(e, pair_amax.shape, _PG, axis, block // sub)
        micro = (pair_amax < exp2_int(e_pairs)).to(torch.int32)

    def element_exp(e_blocks: torch.Tensor) -> torch.Tensor:
        ee = broadcast_param(e_blocks, xf.shape, _PG, axis, block)
        if micro is not None:
            ee = ee - broadcast_param(micro, xf.shape, _PG, axis, sub)
        return ee - (info.mbits - 1)

    q_exp = element_exp(e)
    m = torch.round(xz / exp2_int(q_exp))
    mmin = -mmax
    if sub is None:
        # BFP16: a mantissa rounding past +127 moves the block up one exponent; -128 fits int8.
        mmin = -mmax - 1
        over = reduce_minmax(m, _PG, axis, block)[1] > mmax
        if bool(over.any()):
            e = torch.where(over, (e + 1).clamp(max=_BIAS), e)
            q_exp = element_exp(e)
            m = torch.round(xz / exp2_int(q_exp))
    m = m.clamp(mmin, mmax) + 0.0  # int8 mantissas have no -0
    if sub is None:
        # At the top exponent -128 * 2^121 is -2^128, past float32: such a block saturates at -127.
        top = broadcast_param(e == _BIAS, xf.shape, _PG, axis, block)
        m = torch.where(top, m.clamp(min=-mmax), m)
    code = torch.where(finite, e + _BIAS, torch.full_like(e, _NAN_CODE))
    scale = exp2_int(q_exp)
    scale = torch.where(broadcast_param(finite, xf.shape, _PG, axis, block), scale,
                        torch.full_like(scale, float("nan")))
    return m, code.to(torch.uint8), None if micro is None else micro.to(torch.uint8), scale


def bfp_quantize(x: torch.Tensor, dtype: Dtype | str, *, axis: int = -1,
                 block_size: int | None = None) -> BfpTensor:
    """Quantize ``x`` to BFP16 / MX6 / MX9 storage (block size from the format table when None)."""
    owner = "formats.bfp_quantize"
    info = _info(dtype, owner)
    block = _block(info, block_size, owner)
    normalize_axis(axis, x.ndim, owner, "axis")
    m, code, micro, _ = _quantize_core(x, info, axis, block)
    return BfpTensor(mantissa=m.to(torch.int8), shared_exp=code, micro_exp=micro)


def bfp_dequantize(stored: BfpTensor, dtype: Dtype | str, *, axis: int = -1,
                   block_size: int | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of a :class:`BfpTensor`: ``mantissa * 2^(E - mu - (m - 1))``; NaN for code 255."""
    owner = "formats.bfp_dequantize"
    info = _info(dtype, owner)
    block = _block(info, block_size, owner)
    shape = stored.mantissa.shape
    axis_n = normalize_axis(axis, len(shape), owner, "axis")
    expected = param_shape(shape, _PG, axis_n, block)
    if tuple(stored.shared_exp.shape) != expected:
        raise ValueError(f"{owner}: shared_exp has shape {tuple(stored.shared_exp.shape)}, expected "
                         f"{expected} for mantissas of shape {tuple(shape)} (block {block})")
    code = stored.shared_exp.to(torch.int32)
    ee = broadcast_param(code - _BIAS, shape, _PG, axis_n, block)
    if info.sub_block_size is not None:
        if stored.micro_exp is None:
            raise ValueError(f"{owner}: {info.dtype.name} storage needs micro_exp, got None")
        ee = ee - broadcast_param(stored.micro_exp.to(torch.int32), shape, _PG, axis_n,
                                  info.sub_block_size)
    scale = exp2_int(ee - (info.mbits - 1))
    nan_block = broadcast_param(code == _NAN_CODE, shape, _PG, axis_n, block)
    scale = torch.where(nan_block, torch.full_like(scale, float("nan")), scale)
    return (stored.mantissa.float() * scale).to(out_dtype)


def bfp_fake_quantize(x: torch.Tensor, dtype: Dtype | str, *, axis: int = -1,
                      block_size: int | None = None) -> torch.Tensor:
    """``bfp_dequantize(bfp_quantize(x))`` computed directly, in ``x``'s dtype (bit-identical)."""
    owner = "formats.bfp_fake_quantize"
    info = _info(dtype, owner)
    block = _block(info, block_size, owner)
    normalize_axis(axis, x.ndim, owner, "axis")
    m, _, _, scale = _quantize_core(x, info, axis, block)
    return (m * scale).to(x.dtype)
