"""The one table of numeric formats (layer 2): ranges, bit widths, exponent/mantissa layout.

Every other module (observers, packing, QuantLinear, exporters, docs) reads format facts from
``FORMATS`` and nothing else, so a dtype's range is written exactly once.

References:
- Integers: two's complement ``int{2,4,8}``, unsigned ``uint{4,8}``.
- FP8: OCP 8-bit Floating Point Specification (OFP8) rev 1.0, 2023-06-20 (E4M3 is the "fn"
  variant: no infinities, max 448; E5M2 is IEEE-like, max 57344). Must equal
  ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``.
- FP6 (E3M2, E2M3) and FP4 (E2M1): OCP Microscaling Formats (MX) Specification v1.0, 2023-09,
  section 5.3 (no infinities, no NaN, saturating).
- MX block formats: the same OCP MX spec, section 5 (shared E8M0 scale per block of 32).
- MX6 / MX9: Rouhani et al., "Shared Microexponents: A Little Shifting Goes a Long Way"
  (ISCA 2023): blocks of 16 with an 8-bit shared exponent and a 1-bit micro-exponent per pair.
- BFP16: block floating point, 8-bit shared exponent per block of 8, sign + 7-bit mantissa.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from quark.torch.quantization.config.type import Dtype

FormatKind = Literal["int", "float", "mx", "bfp", "cast"]


@dataclass(frozen=True)
class FormatInfo:
    """Static facts about one quantized data type.

    ``qmin``/``qmax`` are the smallest/largest *code* for integers and the most negative/positive
    finite *value* for floats. ``ebits``/``mbits``/``exp_bias`` describe float elements; ``emax``
    is the exponent of the largest normal power of two. ``block_size`` is the default block for
    MX/BFP formats; ``sub_block_size`` is the number of elements sharing one micro-exponent
    (MX6/MX9). ``torch_dtype`` is the native torch storage dtype when torch has one.
    For block floating point rows (kind ``"bfp"``), ``qmin``/``qmax`` bound the sign-magnitude
    element mantissa (``+-(2^mbits - 1)``); ``bits`` is 9 / 6 for MX9 / MX6 (storage per element
    with the shared bits amortised) and 8 for BFP16 (the element byte; 9 with its shared exponent).
    """

    dtype: Dtype
    kind: FormatKind
    bits: int
    qmin: float
    qmax: float
    signed: bool = True
    ebits: int = 0
    mbits: int = 0
    exp_bias: int = 0
    emax: int = 0
    block_size: int | None = None
    torch_dtype: torch.dtype | None = None
    sub_block_size: int | None = None

    @property
    def is_integer(self) -> bool:
        return self.kind == "int"

    @property
    def is_float(self) -> bool:
        return self.kind == "float"


def _int(dtype: Dtype, bits: int, signed: bool, torch_dtype: torch.dtype) -> FormatInfo:
    qmin = -(2 ** (bits - 1)) if signed else 0
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    return FormatInfo(dtype, "int", bits, qmin, qmax, signed=signed, torch_dtype=torch_dtype)


def _float(dtype: Dtype, ebits: int, mbits: int, max_value: float, emax: int,
           torch_dtype: torch.dtype | None) -> FormatInfo:
    bias = 2 ** (ebits - 1) - 1
    return FormatInfo(dtype, "float", 1 + ebits + mbits, -max_value, max_value, ebits=ebits,
                      mbits=mbits, exp_bias=bias, emax=emax, torch_dtype=torch_dtype)


FORMATS: dict[Dtype, FormatInfo] = {
    Dtype.int8: _int(Dtype.int8, 8, True, torch.int8),
    Dtype.uint8: _int(Dtype.uint8, 8, False, torch.uint8),
    Dtype.int4: _int(Dtype.int4, 4, True, torch.int8),
    Dtype.uint4: _int(Dtype.uint4, 4, False, torch.uint8),
    Dtype.int2: _int(Dtype.int2, 2, True, torch.int8),
    Dtype.fp8_e4m3: _float(Dtype.fp8_e4m3, 4, 3, 448.0, 8, torch.float8_e4m3fn),
    Dtype.fp8_e5m2: _float(Dtype.fp8_e5m2, 5, 2, 57344.0, 15, torch.float8_e5m2),
    Dtype.fp6_e3m2: _float(Dtype.fp6_e3m2, 3, 2, 28.0, 4, None),
    Dtype.fp6_e2m3: _float(Dtype.fp6_e2m3, 2, 3, 7.5, 2, None),
    Dtype.fp4: _float(Dtype.fp4, 2, 1, 6.0, 2, None),
    Dtype.float16: FormatInfo(Dtype.float16, "cast", 16, -65504.0, 65504.0, ebits=5, mbits=10,
                              exp_bias=15, emax=15, torch_dtype=torch.float16),
    Dtype.bfloat16: FormatInfo(Dtype.bfloat16, "cast", 16, -3.3895313892515355e38,
                               3.3895313892515355e38, ebits=8, mbits=7, exp_bias=127, emax=127,
                               torch_dtype=torch.bfloat16),
    # OCP MX: the element format comes from ``mx_element_dtype``; this row describes the shared
    # E8M0 scale (8 bits, biased exponent, 0xFF = NaN).
    Dtype.mx: FormatInfo(Dtype.mx, "mx", 8, -127, 127, signed=False, ebits=8, mbits=0,
                         exp_bias=127, emax=127, block_size=32, torch_dtype=torch.uint8),
    # Block floating point: ``mbits`` counts the magnitude bits of each element (sign separate).
    # MX9 / MX6: 8-bit shared exponent per 16, 1-bit micro-exponent per pair, sign + 7 / 4 bits.
    Dtype.mx9: FormatInfo(Dtype.mx9, "bfp", 9, -127, 127, ebits=8, mbits=7, exp_bias=127,
                          emax=127, block_size=16, sub_block_size=2),
    Dtype.mx6: FormatInfo(Dtype.mx6, "bfp", 6, -15, 15, ebits=8, mbits=4, exp_bias=127, emax=127,
                          block_size=16, sub_block_size=2),
    # BFP16: 8-bit shared exponent per 8, sign + 7 bits (``bits`` here counts the element byte
    # only; with the amortised exponent it is 9 bits per element).
    Dtype.bfp16: FormatInfo(Dtype.bfp16, "bfp", 8, -127, 127, ebits=8, mbits=7, exp_bias=127,
                            emax=127, block_size=8),
}

# Element formats allowed inside an OCP MX block (``mx_element_dtype``); int8 is MXINT8.
MX_ELEMENT_DTYPES: tuple[Dtype, ...] = (
    Dtype.fp8_e4m3, Dtype.fp8_e5m2, Dtype.fp6_e3m2, Dtype.fp6_e2m3, Dtype.fp4, Dtype.int8,
)

INTEGER_DTYPES: tuple[Dtype, ...] = tuple(d for d, f in FORMATS.items() if f.kind == "int")
FLOAT_DTYPES: tuple[Dtype, ...] = tuple(d for d, f in FORMATS.items() if f.kind == "float")
CAST_DTYPES: tuple[Dtype, ...] = tuple(d for d, f in FORMATS.items() if f.kind == "cast")
BFP_DTYPES: tuple[Dtype, ...] = tuple(d for d, f in FORMATS.items() if f.kind == "bfp")


def format_info(dtype: Dtype) -> FormatInfo:
    """The table row for ``dtype`` (raises ``ValueError`` listing the known dtypes)."""
    try:
        return FORMATS[dtype]
    except KeyError:
        known = ", ".join(d.name for d in FORMATS)
        raise ValueError(f"no numeric format for dtype {dtype!r}; known: {known}") from None
