"""Typed helpers that build a ``QuantizationSpec`` from a few string options (layer 1).

Public import path: ``quark.torch.quantization.config.config``. Each helper is a small dataclass,
validated on construction, whose ``to_quantization_spec()`` returns the full spec::

    Int8PerTensorSpec(observer_method="min_max", symmetric=True, scale_type="float",
                      round_method="half_even", is_dynamic=False).to_quantization_spec()
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from quark.torch.quantization.config.spec import (
    QuantizationSpec,
    check_optional_bool,
    check_optional_int,
)
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType, ScaleType
from quark.torch.quantization.formats.table import MX_ELEMENT_DTYPES

# observer_method option -> observer class name, per granularity.
PER_TENSOR_OBSERVER_METHODS: dict[str, str] = {
    "min_max": "PerTensorMinMaxObserver",
    "percentile": "PerTensorPercentileObserver",
    "mse": "PerTensorMSEObserver",
}
PER_CHANNEL_OBSERVER_METHODS: dict[str, str] = {"min_max": "PerChannelMinMaxObserver"}
PER_GROUP_OBSERVER_METHODS: dict[str, str] = {"min_max": "PerGroupMinMaxObserver"}

# scale_type option -> ScaleType ("power_of_2" is the spelling newer Quark helpers accept).
SCALE_TYPE_OPTIONS: dict[str, ScaleType] = {
    "float": ScaleType.float,
    "pof2": ScaleType.pof2,
    "power_of_2": ScaleType.pof2,
    "float32": ScaleType.float32,
    "float16": ScaleType.float16,
    "bfloat16": ScaleType.bfloat16,
}
ROUND_METHOD_OPTIONS: dict[str, RoundType] = {
    "half_even": RoundType.half_even,
    "round": RoundType.round,
    "floor": RoundType.floor,
}


def _option(owner: str, field: str, value: object, options: dict[str, object]) -> object:
    """Look ``value`` up in ``options`` (case-insensitive) or raise listing the allowed options."""
    if isinstance(value, str):
        for key, result in options.items():
            if key.lower() == value.lower():
                return result
    raise ValueError(f"{owner}.{field}={value!r} is not one of: {', '.join(options)}")


class DataTypeSpec(ABC):
    """Base of the typed helpers: a data type with its options -> ``QuantizationSpec``."""

    @abstractmethod
    def to_quantization_spec(self) -> QuantizationSpec:
        """Build the validated ``QuantizationSpec`` this helper describes."""


# --------------------------------------------------------------------------------------------
# integer and fp8 helpers: one shared implementation per granularity
# --------------------------------------------------------------------------------------------
@dataclass(eq=True)
class _PerTensorSpec(DataTypeSpec):
    _dtype: ClassVar[Dtype]
    _observers: ClassVar[dict[str, str]] = PER_TENSOR_OBSERVER_METHODS

    observer_method: str = "min_max"
    symmetric: bool | None = True
    scale_type: str = "float"
    round_method: str = "half_even"
    is_dynamic: bool = False

    def __post_init__(self) -> None:
        self._observer_name()
        self._scale_and_round()
        check_optional_bool(type(self).__name__, "symmetric", self.symmetric)
        check_optional_bool(type(self).__name__, "is_dynamic", self.is_dynamic)
        if self.is_dynamic is None:
            raise ValueError(f"{type(self).__name__}.is_dynamic=None must be True or False")

    def _observer_name(self) -> str:
        return str(_option(type(self).__name__, "observer_method", self.observer_method, self._observers))

    def _scale_and_round(self) -> tuple[ScaleType, RoundType]:
        owner = type(self).__name__
        scale = _option(owner, "scale_type", self.scale_type, SCALE_TYPE_OPTIONS)
        rnd = _option(owner, "round_method", self.round_method, ROUND_METHOD_OPTIONS)
        return scale, rnd  # type: ignore[return-value]

    def _common(self) -> dict[str, object]:
        scale, rnd = self._scale_and_round()
        return dict(dtype=self._dtype, observer_cls=self._observer_name(), symmetric=self.symmetric,
                    scale_type=scale, round_method=rnd, is_dynamic=self.is_dynamic)

    def to_quantization_spec(self) -> QuantizationSpec:
        return QuantizationSpec(qscheme=QSchemeType.per_tensor, **self._common())  # type: ignore[arg-type]


@dataclass(eq=True)
class _PerChannelSpec(_PerTensorSpec):
    _observers: ClassVar[dict[str, str]] = PER_CHANNEL_OBSERVER_METHODS

    ch_axis: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optional_int(type(self).__name__, "ch_axis", self.ch_axis)
        if self.ch_axis is None:
            raise ValueError(f"{type(self).__name__}.ch_axis=None: per-channel needs an int ch_axis")

    def to_quantization_spec(self) -> QuantizationSpec:
        return QuantizationSpec(qscheme=QSchemeType.per_channel, ch_axis=self.ch_axis,
                                **self._common())  # type: ignore[arg-type]


@dataclass(eq=True)
class _PerGroupSpec(_PerTensorSpec):
    _observers: ClassVar[dict[str, str]] = PER_GROUP_OBSERVER_METHODS

    ch_axis: int = -1
    group_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_optional_int(owner, "ch_axis", self.ch_axis)
        check_optional_int(owner, "group_size", self.group_size, positive=True)
        if self.ch_axis is None or self.group_size is None:
            raise ValueError(f"{owner}: per-group needs an int ch_axis and a positive group_size, "
                             f"got ch_axis={self.ch_axis!r}, group_size={self.group_size!r}")

    def to_quantization_spec(self) -> QuantizationSpec:
        return QuantizationSpec(qscheme=QSchemeType.per_group, ch_axis=self.ch_axis,
                                group_size=self.group_size, **self._common())  # type: ignore[arg-type]


@dataclass(eq=True)
class Uint4PerTensorSpec(_PerTensorSpec):
    """uint4, one scale and zero point per tensor (asymmetric by default)."""

    _dtype = Dtype.uint4
    symmetric: bool | None = False


@dataclass(eq=True)
class Uint4PerChannelSpec(_PerChannelSpec):
    """uint4, one scale and zero point per channel along ``ch_axis`` (asymmetric by default)."""

    _dtype = Dtype.uint4
    symmetric: bool | None = False


@dataclass(eq=True)
class Uint4PerGroupSpec(_PerGroupSpec):
    """uint4, one scale and zero point per ``group_size`` elements along ``ch_axis`` (asymmetric)."""

    _dtype = Dtype.uint4
    symmetric: bool | None = False


@dataclass(eq=True)
class Int4PerTensorSpec(_PerTensorSpec):
    """int4, one scale per tensor (symmetric by default)."""

    _dtype = Dtype.int4


@dataclass(eq=True)
class Int4PerChannelSpec(_PerChannelSpec):
    """int4, one scale per channel along ``ch_axis`` (symmetric by default)."""

    _dtype = Dtype.int4


@dataclass(eq=True)
class Int4PerGroupSpec(_PerGroupSpec):
    """int4, one scale per ``group_size`` elements along ``ch_axis`` (symmetric by default)."""

    _dtype = Dtype.int4


@dataclass(eq=True)
class Uint8PerTensorSpec(_PerTensorSpec):
    """uint8, one scale and zero point per tensor (asymmetric by default)."""

    _dtype = Dtype.uint8
    symmetric: bool | None = False


@dataclass(eq=True)
class Uint8PerChannelSpec(_PerChannelSpec):
    """uint8, one scale and zero point per channel (asymmetric by default)."""

    _dtype = Dtype.uint8
    symmetric: bool | None = False


@dataclass(eq=True)
class Uint8PerGroupSpec(_PerGroupSpec):
    """uint8, one scale and zero point per group (asymmetric by default)."""

    _dtype = Dtype.uint8
    symmetric: bool | None = False


@dataclass(eq=True)
class Int8PerTensorSpec(_PerTensorSpec):
    """int8, one scale per tensor (symmetric by default)."""

    _dtype = Dtype.int8


@dataclass(eq=True)
class Int8PerChannelSpec(_PerChannelSpec):
    """int8, one scale per channel along ``ch_axis`` (symmetric by default)."""

    _dtype = Dtype.int8


@dataclass(eq=True)
class Int8PerGroupSpec(_PerGroupSpec):
    """int8, one scale per group (symmetric by default)."""

    _dtype = Dtype.int8


@dataclass(eq=True)
class Int2PerGroupSpec(_PerGroupSpec):
    """int2, one scale per group of 32 (symmetric by default)."""

    _dtype = Dtype.int2
    group_size: int = 32


@dataclass(eq=True)
class FP8E4M3PerTensorSpec(_PerTensorSpec):
    """fp8 e4m3 (OCP "fn", max 448), one scale per tensor."""

    _dtype = Dtype.fp8_e4m3
    symmetric: bool | None = None


@dataclass(eq=True)
class FP8E4M3PerChannelSpec(_PerChannelSpec):
    """fp8 e4m3, one scale per channel along ``ch_axis``."""

    _dtype = Dtype.fp8_e4m3
    symmetric: bool | None = None


@dataclass(eq=True)
class FP8E4M3PerGroupSpec(_PerGroupSpec):
    """fp8 e4m3, one float scale per group."""

    _dtype = Dtype.fp8_e4m3
    symmetric: bool | None = None


@dataclass(eq=True)
class FP8E5M2PerTensorSpec(_PerTensorSpec):
    """fp8 e5m2 (max 57344), one scale per tensor."""

    _dtype = Dtype.fp8_e5m2
    symmetric: bool | None = None


@dataclass(eq=True)
class FP8E5M2PerChannelSpec(_PerChannelSpec):
    """fp8 e5m2, one scale per channel along ``ch_axis``."""

    _dtype = Dtype.fp8_e5m2
    symmetric: bool | None = None


@dataclass(eq=True)
class FP8E5M2PerGroupSpec(_PerGroupSpec):
    """fp8 e5m2, one float scale per group."""

    _dtype = Dtype.fp8_e5m2
    symmetric: bool | None = None


@dataclass(eq=True)
class FP4PerGroupSpec(_PerGroupSpec):
    """fp4 e2m1 with one float scale per group (the first stage of an NVFP4-like two-stage spec)."""

    _dtype = Dtype.fp4
    symmetric: bool | None = None
    group_size: int = 16


# --------------------------------------------------------------------------------------------
# cast and block-format helpers
# --------------------------------------------------------------------------------------------
@dataclass(eq=True)
class Float16Spec(DataTypeSpec):
    """Cast to float16 (no scale)."""

    def to_quantization_spec(self) -> QuantizationSpec:
        return QuantizationSpec(dtype=Dtype.float16, observer_cls="PlaceholderObserver")  # type: ignore[arg-type]


@dataclass(eq=True)
class Bfloat16Spec(DataTypeSpec):
    """Cast to bfloat16 (no scale)."""

    def to_quantization_spec(self) -> QuantizationSpec:
        return QuantizationSpec(dtype=Dtype.bfloat16, observer_cls="PlaceholderObserver")  # type: ignore[arg-type]


@dataclass(eq=True)
class _BlockSpec(DataTypeSpec):
    ch_axis: int = -1
    block_size: int | None = None  # None: the format's own block size (formats table)
    is_dynamic: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_optional_int(owner, "ch_axis", self.ch_axis)
        check_optional_int(owner, "block_size", self.block_size, positive=True)
        check_optional_bool(owner, "is_dynamic", self.is_dynamic)


@dataclass(eq=True)
class MXSpec(_BlockSpec):
    """OCP MX block format: ``mx_element_dtype`` elements sharing one E8M0 scale per block of 32."""

    mx_element_dtype: Dtype | str = Dtype.fp8_e4m3

    def __post_init__(self) -> None:
        super().__post_init__()
        element = Dtype.from_any("MXSpec", "mx_element_dtype", self.mx_element_dtype)
        if element not in MX_ELEMENT_DTYPES:
            raise ValueError(f"MXSpec.mx_element_dtype={element.name} is not one of: "
                             f"{', '.join(d.name for d in MX_ELEMENT_DTYPES)}")
        self.mx_element_dtype = element

    def to_quantization_spec(self) -> QuantizationSpec:
        return QuantizationSpec(dtype=Dtype.mx, mx_element_dtype=self.mx_element_dtype,  # type: ignore[arg-type]
                                qscheme=QSchemeType.per_group, ch_axis=self.ch_axis,
                                group_size=self.block_size, is_dynamic=self.is_dynamic)


@dataclass(eq=True)
class _SharedExponentSpec(_BlockSpec):
    _dtype: ClassVar[Dtype]

    def to_quantization_spec(self) -> QuantizationSpec:
        return QuantizationSpec(dtype=self._dtype, qscheme=QSchemeType.per_group, ch_axis=self.ch_axis,
                                group_size=self.block_size, is_dynamic=self.is_dynamic)


@dataclass(eq=True)
class MX6Spec(_SharedExponentSpec):
    """MX6 (shared microexponents, Rouhani et al. 2023): blocks with an 8-bit shared exponent."""

    _dtype = Dtype.mx6


@dataclass(eq=True)
class MX9Spec(_SharedExponentSpec):
    """MX9 (shared microexponents): like MX6 with 7 magnitude bits per element."""

    _dtype = Dtype.mx9


@dataclass(eq=True)
class BFP16Spec(_SharedExponentSpec):
    """Block floating point: 8-bit shared exponent per block of 8, sign + 7-bit mantissa."""

    _dtype = Dtype.bfp16


@dataclass(eq=True)
class _OCPMXSpec(DataTypeSpec):
    """OCP MX as Quark checkpoints record it: the element dtype with ``scale_format="e8m0"``."""

    _dtype: ClassVar[Dtype]

    is_dynamic: bool = True
    ch_axis: int = -1
    scale_calculation_mode: str = "even"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_optional_bool(owner, "is_dynamic", self.is_dynamic)
        check_optional_int(owner, "ch_axis", self.ch_axis)

    def to_quantization_spec(self) -> QuantizationSpec:
        return QuantizationSpec(dtype=self._dtype, observer_cls="PerBlockMXObserver",  # type: ignore[arg-type]
                                qscheme=QSchemeType.per_group, ch_axis=self.ch_axis, group_size=32,
                                scale_type=ScaleType.float, round_method=RoundType.half_even,
                                scale_format="e8m0", scale_calculation_mode=self.scale_calculation_mode,
                                is_dynamic=self.is_dynamic)


@dataclass(eq=True)
class OCP_MXFP4Spec(_OCPMXSpec):
    """OCP MXFP4: fp4 e2m1 elements, E8M0 scale per 32."""

    _dtype = Dtype.fp4


@dataclass(eq=True)
class OCP_MXFP6E3M2Spec(_OCPMXSpec):
    """OCP MXFP6 e3m2 elements, E8M0 scale per 32."""

    _dtype = Dtype.fp6_e3m2


@dataclass(eq=True)
class OCP_MXFP6E2M3Spec(_OCPMXSpec):
    """OCP MXFP6 e2m3 elements, E8M0 scale per 32."""

    _dtype = Dtype.fp6_e2m3


@dataclass(eq=True)
class OCP_MXFP8E4M3Spec(_OCPMXSpec):
    """OCP MXFP8 e4m3 elements, E8M0 scale per 32."""

    _dtype = Dtype.fp8_e4m3


@dataclass(eq=True)
class OCP_MXFP8E5M2Spec(_OCPMXSpec):
    """OCP MXFP8 e5m2 elements, E8M0 scale per 32."""

    _dtype = Dtype.fp8_e5m2


@dataclass(eq=True)
class OCP_MXINT8Spec(_OCPMXSpec):
    """OCP MXINT8: int8 elements sharing an E8M0 scale per 32 (``Dtype.mx`` + int8 element)."""

    def to_quantization_spec(self) -> QuantizationSpec:
        return QuantizationSpec(dtype=Dtype.mx, mx_element_dtype=Dtype.int8, qscheme=QSchemeType.per_group,
                                ch_axis=self.ch_axis, group_size=32,
                                scale_calculation_mode=self.scale_calculation_mode,
                                is_dynamic=self.is_dynamic)


@dataclass(eq=True)
class ScaleQuantSpec:
    """Two-stage spec: ``first_stage`` quantizes the tensor, ``second_stage`` its scales.

    ``to_quantization_spec()`` returns the list of two specs a ``QuantizationConfig`` field accepts
    (e.g. fp4 per group 16 with fp8 e4m3 per-tensor scales); the second is marked
    ``is_scale_quant=True``.
    """

    first_stage: DataTypeSpec | QuantizationSpec
    second_stage: DataTypeSpec | QuantizationSpec

    def to_quantization_spec(self) -> list[QuantizationSpec]:
        first, second = (s.to_quantization_spec() if isinstance(s, DataTypeSpec) else s
                         for s in (self.first_stage, self.second_stage))
        if not isinstance(first, QuantizationSpec) or not isinstance(second, QuantizationSpec):
            raise ValueError("ScaleQuantSpec stages must be DataTypeSpec helpers or QuantizationSpec, "
                             f"got {type(self.first_stage).__name__}, {type(self.second_stage).__name__}")
        return [first, second.replace(is_scale_quant=True)]
