"""Real low-bit storage of a frozen weight: the one definition of the checkpoint tensor layout.

A frozen ``QuantLinear`` holds its weight exactly as the Quark Hugging Face checkpoint stores it
(``shared/reference/quark-hf-format.md``), so export is a key rename and import a plain
``load_state_dict``:

======================================  ==============================  ==========================
spec                                    ``weight``                      ``scale`` / ``zero_point``
======================================  ==============================  ==========================
int4/uint4 per_group (ch_axis 1)        int32 [in, out/8] (transposed)  [in/g, out] / int32 [in/g, out/8]
int4/uint4 per_channel (ch_axis 0)      int32 [out, in/8]               [out] / int32 [out/8]
int4/uint4 per_tensor                   int32 [out, in/8]               [] / int32 []
int8/uint8/int2 (any granularity)       int8|uint8 codes [out, in]      canonical / code dtype
fp8 e4m3/e5m2                           float8 [out, in]                canonical / none
fp4 / fp6 with float scales             uint8 packed [out, in/2|in*3/4] canonical (two-stage: fp8 + ``scale_2``)
OCP MX (fp4/fp6/fp8/int8 elements)      packed elements                 uint8 E8M0 [out, in/32]
MX6 / MX9 / BFP16                       int8 mantissas [out, in]        uint8 exponents [out, in/block]
float16 / bfloat16                      cast [out, in]                  none
======================================  ==============================  ==========================

"canonical" is the parameter shape of ``formats.param_shape`` ([] per tensor, [out] per channel,
[out, in/g] per group). Int4 nibbles are packed 8 per int32 in ``pack_method`` order ("reorder" or
"order").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from quark.torch.quantization import formats
from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.formats.table import format_info
from quark.torch.quantization.tensor_quantize import check_finite, check_finite_qparams

if TYPE_CHECKING:
    from quark.torch.quantization.config.config import QuantizationSpec
    from quark.torch.quantization.tensor_quantize import FakeQuantize

PACK_METHODS = ("reorder", "order")


@dataclass
class StoredWeight:
    """The tensors a frozen weight is made of (``extra`` holds format-specific additions)."""

    weight: torch.Tensor
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None
    scale_2: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] | None = None


def layout_of(spec: QuantizationSpec) -> str:
    """Name of the storage layout used for a weight quantized per ``spec``."""
    info = format_info(spec.dtype)
    kind = spec.kind
    qscheme = spec.qscheme or QSchemeType.per_tensor
    axis = spec.ch_axis
    if kind == "int":
        if spec.dtype in (Dtype.int4, Dtype.uint4):
            if qscheme == QSchemeType.per_group and axis in (1, -1):
                return "int4_group"
            if qscheme == QSchemeType.per_channel and axis in (0, -2):
                return "int4_channel"
            if qscheme == QSchemeType.per_tensor:
                return "int4_tensor"
        return "int_codes"
    if kind == "float":
        return "fp8" if info.bits == 8 else "fp_small"
    return kind  # "mx", "bfp", "cast"


def _pack_small_float(codes: torch.Tensor, dtype: Dtype) -> torch.Tensor:
    return formats.pack_uint8_nibbles(codes) if dtype == Dtype.fp4 else formats.pack_fp6(codes)


def _unpack_small_float(packed: torch.Tensor, dtype: Dtype, n: int) -> torch.Tensor:
    return formats.unpack_uint8_nibbles(packed, n) if dtype == Dtype.fp4 else formats.unpack_fp6(packed, n)


def _pack_mx_elements(codes: torch.Tensor, element: Dtype) -> torch.Tensor:
    if element in (Dtype.fp4, Dtype.fp6_e2m3, Dtype.fp6_e3m2):
        return _pack_small_float(codes, element)
    return codes


def _unpack_mx_elements(packed: torch.Tensor, element: Dtype, n: int) -> torch.Tensor:
    if element in (Dtype.fp4, Dtype.fp6_e2m3, Dtype.fp6_e3m2):
        return _unpack_small_float(packed, element, n)
    return packed


def pack_weight(weight: torch.Tensor, quantizer: FakeQuantize, pack_method: str = "reorder") -> StoredWeight:
    """Quantize ``weight`` [out, in] with ``quantizer``'s fixed qparams into checkpoint storage."""
    if pack_method not in PACK_METHODS:
        raise ValueError(f"pack_method={pack_method!r} is not one of: {', '.join(PACK_METHODS)}")
    spec = quantizer.spec
    layout = layout_of(spec)
    w = weight.detach()
    name = quantizer.name or "weight_quantizer"
    check_finite(w, name, "weight")
    check_finite_qparams(quantizer.scale, quantizer.zero_point, name)
    if layout == "cast":
        return StoredWeight(w.to(format_info(spec.dtype).torch_dtype), None, None)
    if layout == "mx":
        codes, scale = formats.mx_quantize(w, spec.mx_element, axis=-1, block_size=spec.group_size or 32,
                                           scale_mode=spec.mx_scale_mode)
        return StoredWeight(_pack_mx_elements(codes, spec.mx_element), scale, None)
    if layout == "bfp":
        stored = formats.bfp_quantize(w, spec.dtype, axis=-1, block_size=spec.group_size)
        extra = None if stored.micro_exp is None else {"micro_exponent": stored.micro_exp}
        return StoredWeight(stored.mantissa, stored.shared_exp, None, extra=extra)
    codes = quantizer.quantize(w)
    scale, zero_point = quantizer.scale, quantizer.zero_point
    scale_2 = None
    if quantizer.scale_quantizer is not None and scale is not None:
        second = quantizer.scale_quantizer
        scale_2 = second.scale
        scale = second.quantize(scale)
    if layout == "int4_group":
        packed = formats.pack_int32(codes.t().contiguous(), bits=4, order=pack_method)
        zp = None if zero_point is None else formats.pack_int32(
            zero_point.t().contiguous().to(codes.dtype), bits=4, order=pack_method)
        return StoredWeight(packed, scale.t().contiguous(), zp)
    if layout in ("int4_channel", "int4_tensor"):
        packed = formats.pack_int32(codes, bits=4, order=pack_method)
        zp = zero_point
        if zero_point is not None and layout == "int4_channel":
            zp = formats.pack_int32(zero_point.to(codes.dtype).reshape(-1), bits=4, order=pack_method)
        elif zero_point is not None:
            zp = zero_point.to(torch.int32)
        return StoredWeight(packed, scale, zp)
    if layout == "int_codes":
        zp = None if zero_point is None else zero_point.to(codes.dtype)
        return StoredWeight(codes, scale, zp)
    if layout == "fp8":
        return StoredWeight(codes, scale, None, scale_2=scale_2)
    return StoredWeight(_pack_small_float(codes, spec.dtype), scale, None, scale_2=scale_2)


def unpack_weight(stored: StoredWeight, quantizer: FakeQuantize, shape: tuple[int, int],
                  pack_method: str = "reorder", out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize checkpoint storage back to a float weight of ``shape`` [out, in]."""
    spec = quantizer.spec
    layout = layout_of(spec)
    out_features, in_features = shape
    if layout == "cast":
        return stored.weight.to(out_dtype)
    if layout == "mx":
        element = spec.mx_element
        codes = _unpack_mx_elements(stored.weight, element, in_features)
        return formats.mx_dequantize(codes, stored.scale, element, axis=-1, block_size=spec.group_size or 32,
                                     out_dtype=out_dtype)
    if layout == "bfp":
        micro = (stored.extra or {}).get("micro_exponent")
        bfp = formats.BfpTensor(mantissa=stored.weight, shared_exp=stored.scale, micro_exp=micro)
        return formats.bfp_dequantize(bfp, spec.dtype, axis=-1, block_size=spec.group_size,
                                      out_dtype=out_dtype)
    signed = format_info(spec.dtype).signed
    scale, zero_point = stored.scale, stored.zero_point
    if stored.scale_2 is not None and scale is not None:
        scale = scale.float() * stored.scale_2.float()
    if layout == "int4_group":
        codes = formats.unpack_int32(stored.weight, out_features, bits=4, signed=signed, order=pack_method).t()
        scale = scale.t()
        if zero_point is not None:
            zero_point = formats.unpack_int32(zero_point, out_features, bits=4, signed=signed,
                                              order=pack_method).t()
    elif layout in ("int4_channel", "int4_tensor"):
        codes = formats.unpack_int32(stored.weight, in_features, bits=4, signed=signed, order=pack_method)
        if zero_point is not None and layout == "int4_channel":
            zero_point = formats.unpack_int32(zero_point, out_features, bits=4, signed=signed,
                                              order=pack_method)
    elif layout == "fp_small":
        codes = _unpack_small_float(stored.weight, spec.dtype, in_features)
    else:
        codes = stored.weight
    return formats.dequantize(codes, scale.float(), zero_point, spec.dtype,
                              qscheme=spec.qscheme or QSchemeType.per_tensor, ch_axis=spec.ch_axis,
                              group_size=spec.group_size, out_dtype=out_dtype)


__all__ = ["PACK_METHODS", "StoredWeight", "layout_of", "pack_weight", "unpack_weight"]
