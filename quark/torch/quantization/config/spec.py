"""``QuantizationSpec``: how one tensor is quantized (layer 1).

The public import path is ``quark.torch.quantization.config.config``; this module holds the
implementation so that ``config.py`` stays small. A spec is plain data: it is validated in
``__post_init__`` and serialised with ``to_dict`` / ``from_dict`` exactly as a Quark checkpoint
records it (``reference/quark-hf-format.md``): enums by name, ``observer_cls`` by class name.

Observer classes are resolved only from the allow-list of ``config/observer_registry.py``, which the
observer layer (layer 3, above this one) fills when imported; this module never imports it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from quark.torch.quantization.config.observer_registry import registered_observers
from quark.torch.quantization.config.type import (
    Dtype,
    QSchemeType,
    RoundType,
    ScaleType,
    ZeroPointType,
)
from quark.torch.quantization.formats.table import FORMATS, MX_ELEMENT_DTYPES

logger = logging.getLogger(__name__)

E = TypeVar("E")

# Strings a checkpoint may carry for the MX/BFP shared-scale encoding and its rounding rule.
SCALE_FORMATS: tuple[str, ...] = ("e8m0", "float32", "float16", "bfloat16")
SCALE_CALCULATION_MODES: tuple[str, ...] = ("even", "floor", "ceil")

# Keys of a serialised spec, in the order the Quark checkpoint writes them.
SPEC_KEYS: tuple[str, ...] = (
    "dtype",
    "is_dynamic",
    "qscheme",
    "ch_axis",
    "group_size",
    "block_size",
    "symmetric",
    "round_method",
    "scale_type",
    "zero_point_type",
    "scale_format",
    "scale_calculation_mode",
    "mx_element_dtype",
    "observer_cls",
    "is_scale_quant",
    "enable_buffer_reuse",
    "max_input_numel",
)


# What a spec built without them records, as amd-quark 0.13 writes it for every dtype (zero point
# type, memory hint) or for fp8 (symmetric). A checkpoint that holds null for one of them keeps
# null through from_dict / to_dict, so re-exported checkpoints stay identical. ``scale_type`` is null
# in amd-quark's KV-cache / attention fp8 specs (a float scale, as for "float").
DEFAULT_MAX_INPUT_NUMEL = 4 * 1024 * 1024
NULL_PRESERVING_KEYS: tuple[str, ...] = ("symmetric", "zero_point_type", "max_input_numel", "scale_type")
_SYMMETRIC_FLOAT_DTYPES = (Dtype.fp8_e4m3, Dtype.fp8_e5m2)


# --------------------------------------------------------------------------------------------
# small validation helpers shared by the config modules
# --------------------------------------------------------------------------------------------
def as_enum(owner: str, field: str, cls: type[E], value: object) -> E | None:
    """``None`` stays ``None``; anything else goes through ``cls.from_any`` (raises naming field)."""
    if value is None:
        return None
    return cls.from_any(owner, field, value)  # type: ignore[attr-defined,no-any-return]


# Bounds of integer spec fields: a tensor has at most 64 dims (ch_axis in [-64, 63]); a group or
# block holds at most 2**24 elements (every element index exact in float32); the memory hint
# max_input_numel fits an int64.
MAX_TENSOR_DIMS = 64
MAX_GROUP_SIZE = 2**24
MAX_INPUT_NUMEL = 2**63 - 1
INT_FIELD_RANGES: dict[str, tuple[int, int]] = {
    "ch_axis": (-MAX_TENSOR_DIMS, MAX_TENSOR_DIMS - 1),
    "group_size": (1, MAX_GROUP_SIZE),
    "block_size": (1, MAX_GROUP_SIZE),
    "max_input_numel": (1, MAX_INPUT_NUMEL),
}


def short_repr(value: object) -> str:
    """``repr`` of a config value, cut short (a 400-digit integer must not fill the message)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} chars)"


def check_optional_int(owner: str, field: str, value: object, *, positive: bool = False,
                       bounds: tuple[int, int] | None = None) -> None:
    """Raise unless ``value`` is ``None`` or an ``int`` (bools rejected), positive when asked and
    within ``bounds`` (inclusive; default: ``INT_FIELD_RANGES[field]`` when the field has one)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{field}={short_repr(value)} must be an int or None")
    if positive and value <= 0:
        raise ValueError(f"{owner}.{field}={short_repr(value)} must be a positive int (> 0) or None")
    low, high = bounds or INT_FIELD_RANGES.get(field, (value, value))
    if not low <= value <= high:
        raise ValueError(f"{owner}.{field}={short_repr(value)} is out of range; allowed: an int in [{low}, {high}]")


def check_real(owner: str, field: str, value: object, *, low: float, high: float,
               low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` when ``low_open``), else raise.

    Bools, NaN, infinities and integers too large for a float are refused naming the field.
    """
    allowed = f"> {low:g} and <= {high:g}" if low_open else f"in [{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}.{field}={short_repr(value)} must be a number {allowed}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf if value > 0 else -math.inf
    too_low = number <= low if low_open else number < low
    if not math.isfinite(number) or too_low or number > high:
        raise ValueError(f"{owner}.{field}={short_repr(value)} must be {allowed} (a finite number)")
    return number


# The largest finite float32: KV-cache scales are float32, a lower bound above it makes them all inf.
MAX_FLOAT32 = 3.4028234663852886e38


def check_min_kv_scale(owner: str, value: object) -> float:
    """``min_kv_scale`` as a float: a finite number in [0, largest float32] (NaN would export NaN scales)."""
    return check_real(owner, "min_kv_scale", value, low=0.0, high=MAX_FLOAT32)


def check_optional_bool(owner: str, field: str, value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{owner}.{field}={value!r} must be True, False or None")


def check_known_keys(owner: str, data: object, known: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Return ``data`` as a dict, raising if it is not a dict or holds keys outside ``known``."""
    if not isinstance(data, dict):
        raise ValueError(f"{owner}.from_dict expects a dict, got {type(data).__name__}: {data!r}")
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ValueError(f"{owner}: unknown key(s) {unknown}; known keys: {', '.join(known)}")
    return data


def observer_registry() -> Mapping[str, type]:
    """The allow-list of observer classes, by class name (registered by the observer layer)."""
    return registered_observers()


def resolve_observer(owner: str, value: object) -> type | None:
    """Turn a class or a class name into a registered observer class, or raise listing them."""
    if value is None:
        return None
    registry = observer_registry()
    if isinstance(value, str):
        cls = registry.get(value)
        if cls is None:
            raise ValueError(
                f"{owner}.observer_cls={value!r} is not a known observer; allowed: {', '.join(registry)}"
            )
        return cls
    if isinstance(value, type) and registry.get(value.__name__) is value:
        return value
    raise ValueError(
        f"{owner}.observer_cls={value!r} is not a registered observer class; allowed: {', '.join(registry)}"
    )


def spec_kind(dtype: Dtype, scale_format: str | None) -> str:
    """Format kind used to pick/check observers: a float element with an E8M0 scale is OCP MX."""
    kind = FORMATS[dtype].kind
    if kind == "float" and scale_format == "e8m0":
        return "mx"
    return kind


def default_observer(qscheme: QSchemeType | None, kind: str) -> type | None:
    """The observer a spec gets when it names none.

    Preferred: cast dtypes -> PlaceholderObserver; per_tensor -> PerTensorMinMaxObserver;
    per_channel -> PerChannelMinMaxObserver; per_group -> PerBlockMXObserver for MX/BFP kinds,
    else PerGroupMinMaxObserver. When the preferred class does not declare support for the
    (qscheme, kind) pair, the first registered class that does is used; ``None`` when none does.
    """
    registry = observer_registry()
    if kind == "cast":
        preferred = "PlaceholderObserver"
    elif qscheme == QSchemeType.per_tensor:
        preferred = "PerTensorMinMaxObserver"
    elif qscheme == QSchemeType.per_channel:
        preferred = "PerChannelMinMaxObserver"
    elif qscheme == QSchemeType.per_group:
        preferred = "PerBlockMXObserver" if kind in ("mx", "bfp") else "PerGroupMinMaxObserver"
    else:
        return None
    candidates = [registry[preferred]] if preferred in registry else []
    candidates += [c for n, c in registry.items() if n != preferred]
    for cls in candidates:
        if _observer_supports(cls, qscheme, kind):
            return cls
    return None


def _observer_supports(cls: type, qscheme: QSchemeType | None, kind: str) -> bool:
    qschemes = tuple(getattr(cls, "qschemes", ()))
    kinds = tuple(getattr(cls, "kinds", ()))
    return kind in kinds and (qscheme is None or qscheme in qschemes)


# --------------------------------------------------------------------------------------------
# QuantizationSpec
# --------------------------------------------------------------------------------------------
@dataclass(eq=True)
class QuantizationSpec:
    """Quantization specification of one tensor (weight, input, output or bias).

    :param Dtype dtype: target data type (``Dtype.int8``, ``Dtype.fp8_e4m3``, ``Dtype.mx`` ...).
    :param observer_cls: observer class (or its class name) computing scale / zero point.
        Filled from ``qscheme`` and the dtype when ``None``.
    :param is_dynamic: quantization parameters computed at run time (``True``) or calibrated.
    :param qscheme: ``per_tensor``, ``per_channel`` or ``per_group``.
    :param ch_axis: channel axis for per-channel, grouped axis for per-group.
    :param group_size: elements per group (also the MX/BFP block size).
    :param symmetric: symmetric (zero point 0) or asymmetric; only integers may be asymmetric.
    :param round_method: rounding of ``x / scale`` (``half_even`` by default).
    :param scale_type: ``float``/``pof2`` (or an explicit storage type ``float32``/``float16``/...).
    :param mx_element_dtype: element type inside an OCP MX block (``Dtype.mx`` only).
    :param block_size: synonym of ``group_size`` as some checkpoints record it; kept as given.
    :param zero_point_type: storage of the zero point (``int32`` by default, for every dtype, as Quark
        records it; float formats carry no zero point whatever it says).
    :param scale_format: encoding of a shared scale (``"e8m0"`` for OCP MX, ``"float32"`` ...).
    :param scale_calculation_mode: rounding of the shared exponent (``"even"``, ``"floor"``, ``"ceil"``).
    :param is_scale_quant: this spec quantizes the scales of a first stage (two-stage specs).
    :param enable_buffer_reuse: recorded by Quark checkpoints; a memory hint with no numeric effect.
    :param max_input_numel: recorded by Quark checkpoints (default 4194304); a memory hint with no
        numeric effect.

    ``symmetric`` defaults to ``True`` for integer and fp8 dtypes and stays ``None`` for the others
    (MX, fp4/fp6, casts). ``from_dict`` keeps an explicit ``null`` of ``symmetric``,
    ``zero_point_type``, ``max_input_numel`` and ``scale_type`` (``NULL_PRESERVING_KEYS``) instead of filling the
    default, so that a checkpoint's config round-trips exactly; ``None`` behaves as the default.
    """

    dtype: Dtype
    observer_cls: type | None = None
    is_dynamic: bool | None = None
    qscheme: QSchemeType | None = None
    ch_axis: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    round_method: RoundType | None = None
    scale_type: ScaleType | None = None
    mx_element_dtype: Dtype | None = None
    block_size: int | None = None
    zero_point_type: ZeroPointType | None = None
    scale_format: str | None = None
    scale_calculation_mode: str | None = None
    is_scale_quant: bool = False
    enable_buffer_reuse: bool = False
    max_input_numel: int | None = None

    def __post_init__(self) -> None:
        owner = "QuantizationSpec"
        if self.dtype is None:
            raise ValueError(f"{owner}.dtype is required; allowed: {', '.join(d.name for d in Dtype)}")
        self.dtype = Dtype.from_any(owner, "dtype", self.dtype)  # type: ignore[assignment]
        self.qscheme = as_enum(owner, "qscheme", QSchemeType, self.qscheme)
        self.round_method = as_enum(owner, "round_method", RoundType, self.round_method)
        self.scale_type = as_enum(owner, "scale_type", ScaleType, self.scale_type)
        self.mx_element_dtype = as_enum(owner, "mx_element_dtype", Dtype, self.mx_element_dtype)
        self.zero_point_type = as_enum(owner, "zero_point_type", ZeroPointType, self.zero_point_type)
        for name in ("is_dynamic", "symmetric"):
            check_optional_bool(owner, name, getattr(self, name))
        for name in ("is_scale_quant", "enable_buffer_reuse"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r} must be True or False")
        check_optional_int(owner, "ch_axis", self.ch_axis)
        check_optional_int(owner, "group_size", self.group_size, positive=True)
        check_optional_int(owner, "block_size", self.block_size, positive=True)
        check_optional_int(owner, "max_input_numel", self.max_input_numel, positive=True)
        self._check_choice("scale_format", self.scale_format, SCALE_FORMATS)
        self._check_choice("scale_calculation_mode", self.scale_calculation_mode, SCALE_CALCULATION_MODES)

        if self.block_size is not None:
            if self.group_size is None:
                self.group_size = self.block_size
            elif self.group_size != self.block_size:
                raise ValueError(
                    f"{owner}: block_size={self.block_size} and group_size={self.group_size} disagree; "
                    "block_size is a synonym of group_size, give one or equal values"
                )
        self.observer_cls = resolve_observer(owner, self.observer_cls)
        self._fill_defaults()
        self._validate()

    # ---------------------------------------------------------------- defaults and validation
    def _check_choice(self, name: str, value: object, allowed: tuple[str, ...]) -> None:
        if value is not None and value not in allowed:
            raise ValueError(f"QuantizationSpec.{name}={value!r} is not one of: {', '.join(allowed)}")

    def _fill_defaults(self) -> None:
        info = FORMATS[self.dtype]
        if info.kind in ("mx", "bfp"):
            if self.qscheme is None:
                self.qscheme = QSchemeType.per_group
            if self.group_size is None:
                self.group_size = info.block_size
            if self.ch_axis is None:
                self.ch_axis = -1
        kind = spec_kind(self.dtype, self.scale_format)
        if kind != "cast":
            if self.is_dynamic is None:
                self.is_dynamic = False
            if self.round_method is None:
                self.round_method = RoundType.half_even
            if self.scale_type is None:
                self.scale_type = ScaleType.float
        if self.symmetric is None and (kind == "int" or (kind == "float" and self.dtype in _SYMMETRIC_FLOAT_DTYPES)):
            self.symmetric = True
        if self.zero_point_type is None:
            self.zero_point_type = ZeroPointType.int32
        if self.max_input_numel is None:
            self.max_input_numel = DEFAULT_MAX_INPUT_NUMEL
        if self.observer_cls is None:
            self.observer_cls = default_observer(self.qscheme, kind)

    def _validate(self) -> None:
        owner = "QuantizationSpec"
        info = FORMATS[self.dtype]
        kind = spec_kind(self.dtype, self.scale_format)
        qschemes = ", ".join(q.name for q in QSchemeType)
        if kind in ("int", "float") and self.qscheme is None:
            raise ValueError(
                f"{owner}.qscheme=None is not allowed for dtype {self.dtype.name}; allowed: {qschemes}"
            )
        if self.dtype == Dtype.mx:
            allowed_el = ", ".join(d.name for d in MX_ELEMENT_DTYPES)
            if self.mx_element_dtype not in MX_ELEMENT_DTYPES:
                raise ValueError(
                    f"{owner}.mx_element_dtype={self.mx_element_dtype!r} is required for dtype mx; "
                    f"allowed: {allowed_el}"
                )
        elif self.mx_element_dtype is not None:
            raise ValueError(
                f"{owner}.mx_element_dtype={self.mx_element_dtype.name} is only allowed with dtype mx, "
                f"got dtype {self.dtype.name}; allowed: None"
            )
        if info.kind in ("mx", "bfp") and self.qscheme != QSchemeType.per_group:
            raise ValueError(
                f"{owner}.qscheme={self.qscheme.name if self.qscheme else None} is not allowed for block "
                f"format {self.dtype.name}; allowed: per_group"
            )
        if self.qscheme == QSchemeType.per_group and self.group_size is None:
            raise ValueError(f"{owner}.group_size=None: qscheme per_group needs a positive int group_size")
        if self.qscheme in (QSchemeType.per_tensor, QSchemeType.per_channel) and self.group_size is not None:
            raise ValueError(
                f"{owner}.group_size={self.group_size} is only meaningful with qscheme per_group, "
                f"got {self.qscheme.name}; allowed: None"
            )
        if self.qscheme in (QSchemeType.per_channel, QSchemeType.per_group) and self.ch_axis is None:
            raise ValueError(f"{owner}.ch_axis=None: qscheme {self.qscheme.name} needs an int ch_axis")
        if self.symmetric is False and kind != "int":
            raise ValueError(
                f"{owner}.symmetric=False is not allowed for dtype {self.dtype.name} ({kind} formats are "
                "symmetric; only integer dtypes may be asymmetric); allowed: True, None"
            )
        if kind == "cast" and self.scale_type == ScaleType.pof2:
            raise ValueError(
                f"{owner}.scale_type=pof2 is meaningless for dtype {self.dtype.name}, which is a plain cast "
                "without a scale; allowed: None"
            )
        if self.scale_format == "e8m0" and kind not in ("mx", "float"):
            raise ValueError(
                f"{owner}.scale_format='e8m0' needs a float element dtype (OCP MX), got {self.dtype.name}; "
                f"allowed float dtypes: {', '.join(d.name for d, f in FORMATS.items() if f.kind == 'float')}"
            )
        if self.observer_cls is not None:
            self._validate_observer(kind)

    def _validate_observer(self, kind: str) -> None:
        cls = self.observer_cls
        if cls is None:
            return
        name = cls.__name__
        qschemes = tuple(getattr(cls, "qschemes", ()))
        kinds = tuple(getattr(cls, "kinds", ()))
        if self.qscheme is not None and self.qscheme not in qschemes:
            raise ValueError(
                f"QuantizationSpec.observer_cls={name} does not support qscheme={self.qscheme.name}; "
                f"{name} allows qscheme: {', '.join(q.name for q in qschemes)}"
            )
        if kind not in kinds:
            raise ValueError(
                f"QuantizationSpec.observer_cls={name} does not support dtype {self.dtype.name} "
                f"(format kind {kind!r}); {name} allows kinds: {', '.join(kinds)}"
            )

    @property
    def kind(self) -> str:
        """Format kind this spec quantizes with: "int", "float", "mx", "bfp" or "cast"."""
        return "mx" if self.mx_element is not None else FORMATS[self.dtype].kind

    @property
    def mx_scale_mode(self) -> str:
        """How an MX block's shared exponent is chosen ("floor" per OCP unless the spec records another)."""
        return self.scale_calculation_mode or "floor"

    @property
    def mx_element(self) -> Dtype | None:
        """Element dtype of an OCP MX spec in either spelling, else ``None``.

        ``Dtype.mx`` + ``mx_element_dtype`` (the seed documents' form) and a float dtype with
        ``scale_format="e8m0"`` (the form Quark checkpoints record, e.g. ``"dtype": "fp4"``) both
        describe OCP MX blocks with a shared E8M0 scale.
        """
        if self.dtype == Dtype.mx:
            return self.mx_element_dtype
        if spec_kind(self.dtype, self.scale_format) == "mx":
            return self.dtype
        return None

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        """The checkpoint layout: every key of ``SPEC_KEYS``, enums by name, observer by class name."""
        out: dict[str, Any] = {}
        for key in SPEC_KEYS:
            value = getattr(self, key)
            if key == "observer_cls":
                value = value.__name__ if value is not None else None
            elif isinstance(value, Enum):
                value = value.name
            out[key] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationSpec:
        """Inverse of ``to_dict``; missing optional keys take their defaults, unknown keys raise."""
        data = check_known_keys("QuantizationSpec", data, SPEC_KEYS)
        if "dtype" not in data:
            raise ValueError("QuantizationSpec.from_dict: key 'dtype' is required")
        kwargs = {k: v for k, v in data.items()}
        for key in ("is_scale_quant", "enable_buffer_reuse"):
            if kwargs.get(key, False) is None:
                kwargs[key] = False
        spec = cls(**kwargs)
        spec._restore_nulls({k for k in NULL_PRESERVING_KEYS if k in data and data[k] is None})
        return spec

    def _restore_nulls(self, keys: set[str]) -> None:
        for key in keys:
            setattr(self, key, None)

    def replace(self, **changes: Any) -> QuantizationSpec:
        """A validated copy with ``changes`` applied (``dataclasses.replace``); recorded nulls stay null."""
        new = dataclasses.replace(self, **changes)
        new._restore_nulls({k for k in NULL_PRESERVING_KEYS if k not in changes and getattr(self, k) is None})
        return new


def spec_or_list_to_dict(value: QuantizationSpec | list[QuantizationSpec] | None) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [s.to_dict() for s in value]
    return value.to_dict()


def spec_or_list_from_dict(
    owner: str, field: str, value: object
) -> QuantizationSpec | list[QuantizationSpec] | None:
    if value is None:
        return None
    if isinstance(value, list):
        return [QuantizationSpec.from_dict(v) for v in value]
    if isinstance(value, dict):
        return QuantizationSpec.from_dict(value)
    raise ValueError(f"{owner}.{field}={value!r} must be null, a spec dict or a list of two spec dicts")
