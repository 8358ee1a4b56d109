"""``QuantConfigParser``: Quark ``Config`` <-> the ``quantization_config`` of custom layouts.

transformers' ``QuarkConfig`` calls ``QuantConfigParser.from_custom_config(kwargs,
is_bias_quantized=False)`` for checkpoints whose ``quant_method`` is ``"fp8"`` or ``"awq"``.
"""

from __future__ import annotations

from typing import Any

from quark.torch.quantization.config.config import Config, QuantizationConfig, QuantizationSpec
from quark.torch.quantization.config.type import Dtype, QSchemeType

KV_PATTERNS = ("*k_proj", "*v_proj")
MAX_GROUP_SIZE = 2**20  # larger groups are not a real layout; bounding them keeps numel arithmetic in range


def _layer_names(method: str, field: str, value: Any) -> list[str]:
    """A list of layer names from ``value``: a list of strings, one string (one name) or nothing."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]  # one name, not its characters
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{method} quantization_config.{field} must be a list of layer names (strings), got "
                         f"{type(value).__name__}")
    return list(value)


def _group_size(value: Any) -> int:
    if type(value) is not int or not 0 < value <= MAX_GROUP_SIZE:
        shown = repr(value) if len(repr(value)) <= 40 else f"{type(value).__name__} ({len(repr(value))} chars)"
        raise ValueError(f"awq quantization_config.group_size={shown} must be an integer in 1..{MAX_GROUP_SIZE}")
    return value


def _fp8(dynamic: bool = False) -> QuantizationSpec:
    return QuantizationSpec(dtype=Dtype.fp8_e4m3, qscheme=QSchemeType.per_tensor, is_dynamic=dynamic)


class QuantConfigParser:
    """Build a Quark ``Config`` from a custom-layout ``quantization_config`` dict (fp8, awq)."""

    def __init__(self, quant_config: Config, json_export_config: Any = None) -> None:
        self.quant_config = quant_config
        self.json_export_config = json_export_config

    @staticmethod
    def from_custom_config(custom_config: dict[str, Any], is_bias_quantized: bool = False,
                           is_kv_cache: bool | None = None) -> Config:
        """The Quark config equivalent to an ``fp8`` or ``awq`` ``quantization_config``."""
        if not isinstance(custom_config, dict):
            raise ValueError(f"QuantConfigParser.from_custom_config expects a dict, got {type(custom_config).__name__}")
        method = custom_config.get("quant_method")
        if method == "fp8":
            scheme = custom_config.get("activation_scheme", "static")
            if not isinstance(scheme, str) or scheme.lower() not in ("static", "dynamic"):
                raise ValueError(f"fp8 quantization_config.activation_scheme={str(scheme)[:40]!r} is not one of: "
                                 "static, dynamic")
            scheme = scheme.lower()
            if custom_config.get("weight_block_size") is not None:
                raise ValueError("fp8 quantization_config.weight_block_size: block-wise fp8 is not supported; "
                                 "supported: per-tensor fp8 (weight_block_size null)")
            layer = QuantizationConfig(weight=_fp8(), input_tensors=_fp8(scheme == "dynamic"),
                                       bias=_fp8() if is_bias_quantized else None)
            kv = is_kv_cache if is_kv_cache is not None else custom_config.get("kv_cache_scheme") is not None
            kv_cfg = {p: QuantizationConfig(weight=_fp8(), input_tensors=_fp8(scheme == "dynamic"),
                                            output_tensors=_fp8()) for p in KV_PATTERNS} if kv else {}
            return Config(global_quant_config=layer, layer_quant_config=dict(kv_cfg), kv_cache_quant_config=kv_cfg,
                          exclude=_layer_names("fp8", "ignored_layers", custom_config.get("ignored_layers")))
        if method == "awq":
            bits = custom_config.get("bits", custom_config.get("w_bit", 4))
            if type(bits) is not int or bits != 4:
                raise ValueError(f"awq quantization_config.bits={str(bits)[:40]!r} is not supported; supported: 4")
            group = _group_size(custom_config.get("group_size", custom_config.get("q_group_size", 128)))
            zero_point = custom_config.get("zero_point", True)
            if not isinstance(zero_point, bool):
                raise ValueError(f"awq quantization_config.zero_point must be true or false, got "
                                 f"{type(zero_point).__name__}")
            spec = QuantizationSpec(dtype=Dtype.uint4 if zero_point else Dtype.int4, qscheme=QSchemeType.per_group,
                                    ch_axis=-1, group_size=group, symmetric=not zero_point)
            return Config(global_quant_config=QuantizationConfig(weight=spec),
                          exclude=_layer_names("awq", "modules_to_not_convert",
                                               custom_config.get("modules_to_not_convert")))
        raise ValueError(f"QuantConfigParser.from_custom_config: quant_method={str(method)[:40]!r} is not one of: "
                         "fp8, awq")

    def get_custom_config(self) -> tuple[dict[str, Any], str]:
        """(custom ``quantization_config``, custom mode) matching ``self.quant_config``; ``({}, "quark")``
        when the config fits neither the fp8 nor the awq layout."""
        from quark.torch.export.custom.awq import awq_quantization_config
        from quark.torch.export.custom.fp8 import fp8_quantization_config

        for build, mode in ((fp8_quantization_config, "fp8"), (awq_quantization_config, "awq")):
            try:
                return build(self.quant_config), mode
            except ValueError:
                continue
        return {}, "quark"


__all__ = ["QuantConfigParser"]
