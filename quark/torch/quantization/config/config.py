"""Quark quantization config API for PyTorch (layer 1).

Step 1: a ``QuantizationSpec`` per tensor; step 2: a ``QuantizationConfig`` per module (input,
output, weight, bias); step 3 (optional): algorithm configs; step 4: the model-wide ``Config``.
All are dataclasses validated in ``__post_init__`` (so ``dataclasses.replace`` re-validates) and
serialised with ``to_dict`` / ``from_dict`` in the layout Quark checkpoints record
(``config.json["quantization_config"]``).

The spec, typed helpers and algorithm configs live in ``spec.py``, ``spec_helpers.py`` and
``algo.py``; this module is their public import path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from quark.torch.quantization.config.algo import (
    ALGO_CONFIG_CLASSES,
    AlgoConfig,
    AlgoConfigBase,
    AutoSmoothQuantConfig,
    AWQConfig,
    ConfigBase,
    GPTQConfig,
    PreQuantOptConfig,
    QuaRotConfig,
    RotationConfig,
    SmoothQuantConfig,
    algo_config_from_dict,
    load_pre_optimization_config_from_file,
    load_quant_algo_config_from_file,
)
from quark.torch.quantization.config.spec import (
    SPEC_KEYS,
    QuantizationSpec,
    as_enum,
    check_known_keys,
    check_min_kv_scale,
    spec_or_list_from_dict,
    spec_or_list_to_dict,
)
from quark.torch.quantization.config.spec_helpers import (
    Bfloat16Spec,
    BFP16Spec,
    DataTypeSpec,
    Float16Spec,
    FP4PerGroupSpec,
    FP8E4M3PerChannelSpec,
    FP8E4M3PerGroupSpec,
    FP8E4M3PerTensorSpec,
    FP8E5M2PerChannelSpec,
    FP8E5M2PerGroupSpec,
    FP8E5M2PerTensorSpec,
    Int2PerGroupSpec,
    Int4PerChannelSpec,
    Int4PerGroupSpec,
    Int4PerTensorSpec,
    Int8PerChannelSpec,
    Int8PerGroupSpec,
    Int8PerTensorSpec,
    MX6Spec,
    MX9Spec,
    MXSpec,
    OCP_MXFP4Spec,
    OCP_MXFP6E2M3Spec,
    OCP_MXFP6E3M2Spec,
    OCP_MXFP8E4M3Spec,
    OCP_MXFP8E5M2Spec,
    OCP_MXINT8Spec,
    ScaleQuantSpec,
    Uint4PerChannelSpec,
    Uint4PerGroupSpec,
    Uint4PerTensorSpec,
    Uint8PerChannelSpec,
    Uint8PerGroupSpec,
    Uint8PerTensorSpec,
)
from quark.torch.quantization.config.type import (
    UNFIT_LAYER_MODES,
    DeviceType,
    QSchemeType,
    QuantizationMode,
    ZeroPointType,
)

logger = logging.getLogger(__name__)

TensorSpec = QuantizationSpec | list[QuantizationSpec] | None
LAYER_CONFIG_KEYS: tuple[str, ...] = ("input_tensors", "output_tensors", "weight", "bias", "target_device")
_TENSOR_FIELDS: tuple[str, ...] = LAYER_CONFIG_KEYS[:4]


_ACTIVATION_FIELDS: tuple[str, ...] = ("input_tensors", "output_tensors")
# Axes of a Linear weight [out, in] along which a frozen block-format weight can be stored: its
# blocks run along the input features, as the checkpoint layout records them.
_WEIGHT_BLOCK_AXES: tuple[int, ...] = (-1, 1)


def _stages(value: TensorSpec) -> list[QuantizationSpec]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _check_weight_spec(spec: QuantizationSpec) -> None:
    """Refuse weight specs whose frozen (real low-bit) forward would differ from the fake-quantized one."""
    where = "QuantizationConfig.weight"
    kind = spec.kind
    if kind in ("int", "float") and spec.is_dynamic:
        raise ValueError(
            f"{where}.is_dynamic=True is not supported for a {spec.dtype.name} weight: a frozen weight stores "
            "qparams computed once from the weight (the same ones a dynamic spec would compute); allowed: False")
    if kind in ("mx", "bfp") and spec.ch_axis not in _WEIGHT_BLOCK_AXES:
        raise ValueError(
            f"{where}.ch_axis={spec.ch_axis} is not supported for a {spec.dtype.name} weight: frozen block-format "
            "weights are stored in blocks along the input features (the checkpoint layout); allowed: -1, 1")
    if kind == "int" and spec.symmetric is False and spec.zero_point_type == ZeroPointType.float32:
        raise ValueError(
            f"{where}.zero_point_type=float32 is not supported for an asymmetric {spec.dtype.name} weight: frozen "
            "weights store integer zero points, so the frozen forward would differ from the fake-quantized one; "
            "allowed: int32")


def _check_activation_spec(field_name: str, spec: QuantizationSpec) -> None:
    """Refuse static activation specs whose calibrated parameters depend on the calibration batch shape."""
    if spec.kind not in ("int", "float") or spec.is_dynamic:
        return
    where = f"QuantizationConfig.{field_name}"
    if spec.qscheme == QSchemeType.per_group:
        raise ValueError(
            f"{where}.qscheme=per_group with is_dynamic=False is not supported: a calibrated per-group scale has "
            "the calibration batch's shape and cannot apply to other batch sizes or sequence lengths; allowed: "
            "is_dynamic=True, or qscheme per_tensor / per_channel (ch_axis=-1)")
    if spec.qscheme == QSchemeType.per_channel and spec.ch_axis != -1:
        raise ValueError(
            f"{where}.ch_axis={spec.ch_axis} with qscheme=per_channel and is_dynamic=False is not supported: "
            "only the last (hidden) axis of an activation has a fixed length; allowed: -1")


@dataclass(eq=True)
class QuantizationConfig:
    """Quantization of one module's tensors: ``input_tensors``, ``output_tensors``, ``weight``, ``bias``.

    Each is ``None`` (not quantized at this level; a more general level may apply), a
    ``QuantizationSpec``, or a list of two specs (two-stage: the second quantizes the first's
    scales, or a progressive second stage). ``target_device`` records the intended device.
    """

    input_tensors: TensorSpec = None
    output_tensors: TensorSpec = None
    weight: TensorSpec = None
    bias: TensorSpec = None
    target_device: DeviceType | None = None

    def __post_init__(self) -> None:
        owner = "QuantizationConfig"
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is None or isinstance(value, QuantizationSpec):
                continue
            if isinstance(value, list):
                if len(value) != 2 or not all(isinstance(v, QuantizationSpec) for v in value):
                    raise ValueError(
                        f"{owner}.{name}: a list must hold exactly two QuantizationSpec (two-stage), "
                        f"got {[type(v).__name__ for v in value]}"
                    )
                continue
            hint = " (use QuantizationSpec.from_dict for a dict)" if isinstance(value, dict) else ""
            if isinstance(value, DataTypeSpec):
                hint = " (call .to_quantization_spec() on the helper)"
            raise ValueError(
                f"{owner}.{name}={value!r} must be None, a QuantizationSpec or a list of two "
                f"QuantizationSpec{hint}"
            )
        self.target_device = as_enum(owner, "target_device", DeviceType, self.target_device)
        for stage in _stages(self.weight):
            _check_weight_spec(stage)
        for name in _ACTIVATION_FIELDS:
            for stage in _stages(getattr(self, name)):
                _check_activation_spec(name, stage)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: spec_or_list_to_dict(getattr(self, name)) for name in _TENSOR_FIELDS}
        # Quark writes the device by value ("cpu"); from_dict accepts value or name.
        out["target_device"] = self.target_device.value if self.target_device is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationConfig:
        owner = "QuantizationConfig"
        data = check_known_keys(owner, data, LAYER_CONFIG_KEYS)
        kwargs: dict[str, Any] = {name: spec_or_list_from_dict(owner, name, data.get(name))
                                  for name in _TENSOR_FIELDS}
        return cls(target_device=data.get("target_device"), **kwargs)


def _layer_type_key_from_name(name: str) -> type[nn.Module] | str:
    """A ``torch.nn`` module class by name (the only classes resolved); other names stay strings."""
    cls = getattr(nn, name, None)
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        return cls
    return name


def _layer_type_key_to_name(key: type[nn.Module] | str) -> str:
    return key if isinstance(key, str) else key.__name__


_CONFIG_KEYS: tuple[str, ...] = (
    "global_quant_config", "exclude", "algo_config", "softmax_quant_spec", "layer_type_quant_config",
    "layer_quant_config", "kv_cache_quant_config", "kv_cache_post_rope", "quant_mode",
    "log_severity_level", "pre_quant_opt_config", "min_kv_scale",
)
# Keys the exporter wraps around Config.to_dict(); Config.from_dict skips them.
_EXPORT_KEYS: tuple[str, ...] = ("quant_method", "version", "export")
_DEFAULT_LOG_SEVERITY = 1


@dataclass(eq=True)
class Config:
    """Model-wide quantization configuration.

    :param QuantizationConfig global_quant_config: applied to every module unless overridden.
    :param layer_type_quant_config: per module type (an ``nn.Module`` subclass or its class name).
    :param layer_quant_config: per module name, keys are fnmatch patterns (``"*.v_proj"``).
    :param kv_cache_quant_config: KV-cache quantization per pattern (``"*k_proj"``, ``"*v_proj"``).
    :param exclude: fnmatch patterns of modules left unquantized.
    :param algo_config: ``None``, one algorithm config or a list; stored as a list (or ``None``).
    :param pre_quant_opt_config: pre-quantization optimizations (SmoothQuant, rotation, ...).
    :param QuantizationMode quant_mode: ``eager_mode`` (default) or ``fx_graph_mode``.
    :param log_severity_level: 0 DEBUG, 1 INFO, 2 WARNING, 3 ERROR, 4 CRITICAL. Default 1.
    :param softmax_quant_spec: spec of the attention softmax output (attention quantization).
    :param bool kv_cache_post_rope: quantize K after RoPE (inside the cache update).
    :param float min_kv_scale: lower bound of KV-cache scales. Default 0.0.
    :param str unfit_layers: what happens to a layer whose shape its per-group / block config does not
        fit (e.g. group 128 on a 576-wide input): ``"error"`` (default: quantization refuses, naming
        each tensor), ``"keep"`` (the layer stays in float) or ``"fallback"`` (the nearest spec that
        fits: the largest power-of-two group >= 8 below the requested one that divides, else weights
        per output channel, else float). Quantization records the outcome in this Config (``exclude``
        or an exact-name ``layer_quant_config`` entry) so exports describe what each layer got.

    Precedence when resolving a module: exclude > layer_quant_config > layer_type_quant_config >
    global_quant_config.
    """

    global_quant_config: QuantizationConfig
    layer_type_quant_config: dict[type[nn.Module] | str, QuantizationConfig] = field(default_factory=dict)
    layer_quant_config: dict[str, QuantizationConfig] = field(default_factory=dict)
    kv_cache_quant_config: dict[str, QuantizationConfig] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    algo_config: AlgoConfigBase | list[AlgoConfigBase] | None = None
    pre_quant_opt_config: list[PreQuantOptConfig] = field(default_factory=list)
    quant_mode: QuantizationMode = QuantizationMode.eager_mode
    log_severity_level: int | None = _DEFAULT_LOG_SEVERITY
    softmax_quant_spec: QuantizationSpec | None = None
    kv_cache_post_rope: bool = False
    min_kv_scale: float = 0.0
    unfit_layers: str = "error"

    def __post_init__(self) -> None:
        owner = "Config"
        if not isinstance(self.global_quant_config, QuantizationConfig):
            raise ValueError(f"{owner}.global_quant_config={self.global_quant_config!r} must be a "
                             "QuantizationConfig")
        for name in ("layer_quant_config", "kv_cache_quant_config"):
            self._check_layer_dict(name, getattr(self, name), allow_types=False)
        self._check_layer_dict("layer_type_quant_config", self.layer_type_quant_config, allow_types=True)
        if self.exclude is None:
            self.exclude = []
        if isinstance(self.exclude, tuple):
            self.exclude = list(self.exclude)
        if not isinstance(self.exclude, list) or not all(isinstance(p, str) for p in self.exclude):
            raise ValueError(f"{owner}.exclude={self.exclude!r} must be a list of fnmatch pattern strings")
        self.algo_config = self._normalise_algo(self.algo_config)
        self.pre_quant_opt_config = self._normalise_pre_quant(self.pre_quant_opt_config)
        self.quant_mode = QuantizationMode.from_any(owner, "quant_mode", self.quant_mode)  # type: ignore[assignment]
        if self.log_severity_level is not None and (
            isinstance(self.log_severity_level, bool) or self.log_severity_level not in range(5)
        ):
            raise ValueError(f"{owner}.log_severity_level={self.log_severity_level!r} is not one of: "
                             "0, 1, 2, 3, 4, None")
        if self.softmax_quant_spec is not None and not isinstance(self.softmax_quant_spec, QuantizationSpec):
            raise ValueError(f"{owner}.softmax_quant_spec={self.softmax_quant_spec!r} must be None or a "
                             "QuantizationSpec")
        if not isinstance(self.kv_cache_post_rope, bool):
            raise ValueError(f"{owner}.kv_cache_post_rope={self.kv_cache_post_rope!r} must be True or False")
        self.min_kv_scale = check_min_kv_scale(owner, self.min_kv_scale)
        if self.unfit_layers not in UNFIT_LAYER_MODES:
            raise ValueError(f"{owner}.unfit_layers={self.unfit_layers!r} is not one of: "
                             f"{', '.join(UNFIT_LAYER_MODES)}")

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _check_layer_dict(name: str, value: object, *, allow_types: bool) -> None:
        if not isinstance(value, dict):
            raise ValueError(f"Config.{name}={value!r} must be a dict of QuantizationConfig")
        for key, cfg in value.items():
            key_ok = isinstance(key, str) or (
                allow_types and isinstance(key, type) and issubclass(key, nn.Module))
            if not key_ok:
                allowed = "an nn.Module subclass or a class-name string" if allow_types else "a str pattern"
                raise ValueError(f"Config.{name} key {key!r} must be {allowed}")
            if not isinstance(cfg, QuantizationConfig):
                raise ValueError(f"Config.{name}[{key!r}]={cfg!r} must be a QuantizationConfig")

    @staticmethod
    def _normalise_algo(value: object) -> list[AlgoConfigBase] | None:
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, AlgoConfigBase):
                names = ", ".join(c.__name__ for c in ALGO_CONFIG_CLASSES)
                raise ValueError(f"Config.algo_config entry {item!r} is not an algorithm config; "
                                 f"allowed: {names}")
        return list(items) or None

    def _layer_configs(self) -> list[tuple[str, QuantizationConfig]]:
        """Every per-module config with the field path naming it in errors."""
        out = [("global_quant_config", self.global_quant_config)]
        out += [(f"layer_type_quant_config[{_layer_type_key_to_name(k)!r}]", v)
                for k, v in self.layer_type_quant_config.items()]
        out += [(f"layer_quant_config[{k!r}]", v) for k, v in self.layer_quant_config.items()]
        return out

    @staticmethod
    def _normalise_pre_quant(value: object) -> list[PreQuantOptConfig]:
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, PreQuantOptConfig):
                names = ", ".join(c.__name__ for c in ALGO_CONFIG_CLASSES if issubclass(c, PreQuantOptConfig))
                raise ValueError(f"Config.pre_quant_opt_config entry {item!r} is not one of: {names}")
        return list(items)

    # ------------------------------------------------------------------ mutators (documented API)
    def set_algo_config(self, algo_config: AlgoConfigBase | list[AlgoConfigBase] | None) -> None:
        """Replace the algorithm configuration (validated, stored as a list or ``None``)."""
        self.algo_config = self._normalise_algo(algo_config)

    def add_pre_optimization_config(self, pre_quant_opt_config: PreQuantOptConfig) -> None:
        """Append a pre-quantization optimization (SmoothQuant, rotation, ...)."""
        items = [*self.pre_quant_opt_config, pre_quant_opt_config]
        self.pre_quant_opt_config = self._normalise_pre_quant(items)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` layout of a Quark checkpoint (without quant_method/version/export)."""
        out: dict[str, Any] = {
            "global_quant_config": self.global_quant_config.to_dict(),
            "exclude": list(self.exclude),
            "algo_config": [a.to_dict() for a in self.algo_config] if self.algo_config else None,  # type: ignore[union-attr]
            "softmax_quant_spec": self.softmax_quant_spec.to_dict() if self.softmax_quant_spec else None,
            "layer_type_quant_config": {_layer_type_key_to_name(k): v.to_dict()
                                        for k, v in self.layer_type_quant_config.items()},
            "layer_quant_config": {k: v.to_dict() for k, v in self.layer_quant_config.items()},
            "kv_cache_quant_config": {k: v.to_dict() for k, v in self.kv_cache_quant_config.items()},
            "kv_cache_post_rope": self.kv_cache_post_rope,
            "quant_mode": self.quant_mode.name,
        }
        if self.log_severity_level != _DEFAULT_LOG_SEVERITY:
            out["log_severity_level"] = self.log_severity_level
        if self.pre_quant_opt_config:
            out["pre_quant_opt_config"] = [p.to_dict() for p in self.pre_quant_opt_config]
        if self.min_kv_scale != 0.0:
            out["min_kv_scale"] = self.min_kv_scale
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Inverse of ``to_dict``; also reads a checkpoint's ``quantization_config``.

        ``quant_method`` and ``version`` are skipped; ``export`` is skipped except its
        ``min_kv_scale`` (used when no top-level ``min_kv_scale`` is given). Other unknown keys raise.
        """
        data = check_known_keys("Config", data, _CONFIG_KEYS + _EXPORT_KEYS)
        if "global_quant_config" not in data:
            raise ValueError("Config.from_dict: key 'global_quant_config' is required")

        def layer_dict(name: str) -> dict[str, QuantizationConfig]:
            value = data.get(name) or {}
            if not isinstance(value, dict):
                raise ValueError(f"Config.{name}={value!r} must be an object of layer configs")
            return {k: QuantizationConfig.from_dict(v) for k, v in value.items()}

        algo = data.get("algo_config")
        if isinstance(algo, dict):  # single-entry layout of older checkpoints
            algo = [algo]
        min_kv_scale = data.get("min_kv_scale")
        export = data.get("export")
        if min_kv_scale is None and isinstance(export, dict):
            min_kv_scale = export.get("min_kv_scale")
        softmax = data.get("softmax_quant_spec")
        return cls(
            global_quant_config=QuantizationConfig.from_dict(data["global_quant_config"]),
            layer_type_quant_config={_layer_type_key_from_name(k): v
                                     for k, v in layer_dict("layer_type_quant_config").items()},
            layer_quant_config=layer_dict("layer_quant_config"),
            kv_cache_quant_config=layer_dict("kv_cache_quant_config"),
            exclude=data.get("exclude") or [],
            algo_config=[algo_config_from_dict(a) for a in algo] if algo else None,
            pre_quant_opt_config=[algo_config_from_dict(p) for p in data.get("pre_quant_opt_config") or []],  # type: ignore[misc]
            quant_mode=data.get("quant_mode", QuantizationMode.eager_mode),
            log_severity_level=data.get("log_severity_level", _DEFAULT_LOG_SEVERITY),
            softmax_quant_spec=QuantizationSpec.from_dict(softmax) if softmax is not None else None,
            kv_cache_post_rope=data.get("kv_cache_post_rope", False),
            min_kv_scale=0.0 if min_kv_scale is None else min_kv_scale,
        )


# Names of newer Quark releases for the same classes.
QConfig = Config
QLayerConfig = QuantizationConfig
QTensorConfig = QuantizationSpec

__all__ = [
    "ALGO_CONFIG_CLASSES",
    "LAYER_CONFIG_KEYS",
    "SPEC_KEYS",
    "AWQConfig",
    "AlgoConfig",
    "AlgoConfigBase",
    "AutoSmoothQuantConfig",
    "BFP16Spec",
    "Bfloat16Spec",
    "Config",
    "ConfigBase",
    "DataTypeSpec",
    "FP4PerGroupSpec",
    "FP8E4M3PerChannelSpec",
    "FP8E4M3PerGroupSpec",
    "FP8E4M3PerTensorSpec",
    "FP8E5M2PerChannelSpec",
    "FP8E5M2PerGroupSpec",
    "FP8E5M2PerTensorSpec",
    "Float16Spec",
    "GPTQConfig",
    "Int2PerGroupSpec",
    "Int4PerChannelSpec",
    "Int4PerGroupSpec",
    "Int4PerTensorSpec",
    "Int8PerChannelSpec",
    "Int8PerGroupSpec",
    "Int8PerTensorSpec",
    "MX6Spec",
    "MX9Spec",
    "MXSpec",
    "OCP_MXFP4Spec",
    "OCP_MXFP6E2M3Spec",
    "OCP_MXFP6E3M2Spec",
    "OCP_MXFP8E4M3Spec",
    "OCP_MXFP8E5M2Spec",
    "OCP_MXINT8Spec",
    "PreQuantOptConfig",
    "QConfig",
    "QLayerConfig",
    "QTensorConfig",
    "QuaRotConfig",
    "QuantizationConfig",
    "QuantizationSpec",
    "RotationConfig",
    "ScaleQuantSpec",
    "SmoothQuantConfig",
    "Uint4PerChannelSpec",
    "Uint4PerGroupSpec",
    "Uint4PerTensorSpec",
    "Uint8PerChannelSpec",
    "Uint8PerGroupSpec",
    "Uint8PerTensorSpec",
    "algo_config_from_dict",
    "load_pre_optimization_config_from_file",
    "load_quant_algo_config_from_file",
]
