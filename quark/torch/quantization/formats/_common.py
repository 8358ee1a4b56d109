"""Small helpers shared by the format modules: dtype coercion, exact powers of two, rounding."""

from __future__ import annotations

import torch

from quark.torch.quantization.config.type import Dtype, RoundType
from quark.torch.quantization.formats.table import FORMATS, FormatInfo

# float32 bit layout
_F32_MBITS = 23
_F32_BIAS = 127
_F32_MIN_SUBNORMAL_EXP = -149


def as_dtype(value: Dtype | str, owner: str = "formats", field: str = "dtype") -> Dtype:
    """``value`` as a ``Dtype`` (strings accepted; ``ValueError`` names the allowed dtypes)."""
    return Dtype.from_any(owner, field, value)  # type: ignore[return-value]


def info_of_kind(value: Dtype | str, kinds: tuple[str, ...], owner: str,
                 allowed: tuple[Dtype, ...] | None = None) -> FormatInfo:
    """The table row of ``value``, checking that its kind (or the dtype itself) is allowed here."""
    dtype = as_dtype(value, owner)
    info = FORMATS[dtype]
    ok = dtype in allowed if allowed is not None else info.kind in kinds
    if not ok:
        names = allowed if allowed is not None else tuple(d for d, f in FORMATS.items()
                                                           if f.kind in kinds)
        raise ValueError(f"{owner}: dtype={dtype.name} is not supported here; allowed: "
                         f"{', '.join(d.name for d in names)}")
    return info


def as_round_type(value: RoundType | str) -> RoundType:
    return RoundType.from_any("formats", "round_method", value)  # type: ignore[return-value]


def exp2_int(e: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0 ** e`` as float32 for integer ``e`` (built from bits, subnormals included).

    ``e`` outside float32's range saturates: below ``-149`` gives 0, above 127 gives ``inf``.
    """
    e = e.to(torch.int32)
    normal = (e.clamp(-126, 127) + _F32_BIAS) << _F32_MBITS
    # A subnormal power of two 2^e (e in [-149, -127]) is the single mantissa bit e + 149.
    sub = torch.ones_like(e) << (e.clamp(_F32_MIN_SUBNORMAL_EXP, -127) - _F32_MIN_SUBNORMAL_EXP)
    bits = torch.where(e >= -126, normal, sub)
    out = bits.view(torch.float32)
    out = torch.where(e < _F32_MIN_SUBNORMAL_EXP, torch.zeros_like(out), out)
    return torch.where(e > 127, torch.full_like(out, float("inf")), out)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2(a))`` (int32) for finite ``a > 0``; other inputs give meaningless values.

    ``torch.frexp`` is exact where ``torch.log2`` may round a value just below ``2**k`` up to ``k``.
    """
    _, e = torch.frexp(a.float())
    return e.to(torch.int32) - 1


def round_values(v: torch.Tensor, method: RoundType | str) -> torch.Tensor:
    """Round ``v`` to integers: half_even (banker's), round (half away from zero) or floor."""
    m = as_round_type(method)
    if m == RoundType.half_even:
        return torch.round(v)
    if m == RoundType.floor:
        return torch.floor(v)
    # Half away from zero, exactly: ``floor(|v| + 0.5)`` misrounds 0.49999997 in float32.
    t = torch.trunc(v)
    frac = v - t
    return t + torch.where(frac.abs() >= 0.5, torch.sign(frac), torch.zeros_like(frac))
