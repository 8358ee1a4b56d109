"""Numeric formats (layer 2): pure tensor functions per dtype family.

- :mod:`.table` -- ``FORMATS``, the single source of truth for ranges and bit widths.
- :mod:`.granularity` -- canonical parameter shapes, reductions and broadcasting per qscheme.
- :mod:`.affine` -- ``quantize`` / ``dequantize`` / ``fake_quantize`` for integers, FP8/FP6/FP4
  with a scale, and fp16/bf16 casts.
- :mod:`.floats` -- FP8/FP6/FP4 grids and bit patterns (OCP OFP8 rev 1.0, OCP MX v1.0).
- :mod:`.mx` -- OCP MX block formats with E8M0 shared scales.
- :mod:`.bfp` -- BFP16, MX6, MX9 (shared exponents, micro-exponents).
- :mod:`.packing` -- sub-byte packing (int32 nibbles, uint8 nibbles, fp6 in 3 bytes).

Everything here is a plain PyTorch reference path: it runs on CPU and on any device the inputs
live on; no configuration objects. The one process-wide setting is the integer division mode
(:func:`set_integer_division`: ``"reciprocal"``, amd-quark 0.13's ``x * (1 / scale)``, by default;
``"exact"`` for IEEE ``x / scale``).
"""

from quark.torch.quantization.formats.affine import (
    INTEGER_DIVISIONS,
    dequantize,
    divide_by_scale,
    fake_quantize,
    get_integer_division,
    integer_division,
    quantize,
    set_integer_division,
)
from quark.torch.quantization.formats.bfp import (
    BfpTensor,
    bfp_dequantize,
    bfp_fake_quantize,
    bfp_quantize,
)
from quark.torch.quantization.formats.floats import (
    FLOAT_ELEMENT_DTYPES,
    code_to_float,
    float_to_code,
    round_to_float_grid,
)
from quark.torch.quantization.formats.granularity import (
    broadcast_param,
    param_shape,
    reduce_amax,
    reduce_minmax,
)
from quark.torch.quantization.formats.mx import (
    MX_SCALE_MODES,
    e8m0_to_float,
    float_to_e8m0,
    mx_dequantize,
    mx_fake_quantize,
    mx_quantize,
    mx_shared_exponent,
)
from quark.torch.quantization.formats.packing import (
    PACK_ORDERS,
    pack_fp6,
    pack_int32,
    pack_uint8_nibbles,
    unpack_fp6,
    unpack_int32,
    unpack_uint8_nibbles,
)
from quark.torch.quantization.formats.table import (
    BFP_DTYPES,
    CAST_DTYPES,
    FLOAT_DTYPES,
    FORMATS,
    INTEGER_DTYPES,
    MX_ELEMENT_DTYPES,
    FormatInfo,
    format_info,
)

__all__ = [
    "BFP_DTYPES",
    "CAST_DTYPES",
    "FLOAT_DTYPES",
    "FLOAT_ELEMENT_DTYPES",
    "FORMATS",
    "INTEGER_DIVISIONS",
    "INTEGER_DTYPES",
    "MX_ELEMENT_DTYPES",
    "MX_SCALE_MODES",
    "PACK_ORDERS",
    "BfpTensor",
    "FormatInfo",
    "bfp_dequantize",
    "bfp_fake_quantize",
    "bfp_quantize",
    "broadcast_param",
    "code_to_float",
    "dequantize",
    "divide_by_scale",
    "e8m0_to_float",
    "fake_quantize",
    "float_to_code",
    "float_to_e8m0",
    "format_info",
    "get_integer_division",
    "integer_division",
    "mx_dequantize",
    "mx_fake_quantize",
    "mx_quantize",
    "mx_shared_exponent",
    "pack_fp6",
    "pack_int32",
    "pack_uint8_nibbles",
    "param_shape",
    "quantize",
    "reduce_amax",
    "reduce_minmax",
    "round_to_float_grid",
    "set_integer_division",
    "unpack_fp6",
    "unpack_int32",
    "unpack_uint8_nibbles",
]
