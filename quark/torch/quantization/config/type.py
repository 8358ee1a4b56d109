"""Enumerations of the Quark configuration API (layer 1).

Every enum member's *name* is what the Quark checkpoint format writes to JSON
(``"dtype": "fp8_e4m3"``); the value is the same string, so ``Dtype("int8")`` and
``Dtype["int8"]`` both work.
"""

from __future__ import annotations

from enum import Enum


class _NamedEnum(str, Enum):
    """A string enum whose value equals its name; ``str(x)`` gives the name."""

    def __str__(self) -> str:
        return self.name

    @classmethod
    def from_any(cls, owner: str, field: str, value: object) -> _NamedEnum:
        """Convert ``value`` (member, name or value, any case) to a member or raise naming the field."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Enum):
            value = value.name
        key = str(value).strip()
        for member in cls:
            if key == member.name or key == member.value or key.lower() == member.name.lower():
                return member
        allowed = ", ".join(m.name for m in cls)
        raise ValueError(f"{owner}.{field}={value!r} is not one of: {allowed}")


class Dtype(_NamedEnum):
    """Data types a tensor can be quantized to."""

    int8 = "int8"
    uint8 = "uint8"
    int4 = "int4"
    uint4 = "uint4"
    int2 = "int2"
    bfloat16 = "bfloat16"
    float16 = "float16"
    fp8_e4m3 = "fp8_e4m3"
    fp8_e5m2 = "fp8_e5m2"
    fp6_e3m2 = "fp6_e3m2"
    fp6_e2m3 = "fp6_e2m3"
    fp4 = "fp4"
    mx = "mx"
    mx6 = "mx6"
    mx9 = "mx9"
    bfp16 = "bfp16"


class QSchemeType(_NamedEnum):
    """Granularity of the quantization parameters."""

    per_tensor = "per_tensor"
    per_channel = "per_channel"
    per_group = "per_group"


class ScaleType(_NamedEnum):
    """How a scale is represented: any float, or a power of two.

    ``float`` is float32; ``float32``/``float16``/``bfloat16`` name the scale's storage dtype
    explicitly (newer Quark releases write these).
    """

    float = "float"
    pof2 = "pof2"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class RoundType(_NamedEnum):
    """Rounding of ``x / scale`` to the integer grid."""

    round = "round"  # half away from zero
    floor = "floor"
    half_even = "half_even"


class QuantizationMode(_NamedEnum):
    """How the model is transformed: module swapping (eager) or an FX graph."""

    eager_mode = "eager_mode"
    fx_graph_mode = "fx_graph_mode"


class DeviceType(_NamedEnum):
    """Target device a layer's configuration is meant for."""

    CPU = "cpu"
    GPU = "gpu"
    IPU = "ipu"
    NPU = "npu"


class ZeroPointType(_NamedEnum):
    """Storage type of an asymmetric zero point."""

    int32 = "int32"
    float32 = "float32"


#: What ``Config.unfit_layers`` does with a layer whose shape its group or block size does not divide.
UNFIT_LAYER_MODES = ("error", "keep", "fallback")
