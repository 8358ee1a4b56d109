"""Export settings (public path ``quark.torch.export.config.config``).

``JsonExporterConfig`` is also what transformers' ``QuarkConfig`` rebuilds from a checkpoint's
``quantization_config["export"]`` block (``JsonExporterConfig(**export)``), so its field names and
defaults are those of the checkpoint format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from quark.torch.quantization.config.spec import check_min_kv_scale
from quark.torch.quantization.nn.modules.weight_layout import PACK_METHODS

WEIGHT_FORMATS = ("real_quantized", "fake_quantized")


@dataclass
class JsonExporterConfig:
    """Settings of the hf_format (JSON + safetensors) export.

    :param weight_merge_groups: groups of layer-name patterns (``[["*q_proj", "*k_proj", "*v_proj"]]``)
        whose per-tensor weight scales are unified to their maximum (weights re-quantized with it),
        for engines that fuse those layers. ``None`` keeps every scale.
    :param kv_cache_group: patterns of the layers whose output scales are the KV-cache scales
        (``["*k_proj", "*v_proj"]``); filled from the quantization config when left empty.
    :param min_kv_scale: lower bound applied to the exported KV-cache scales.
    :param pack_method: int4 nibble order in int32 words: ``"reorder"`` (Quark's default) or ``"order"``.
    :param weight_format: ``"real_quantized"`` (low-bit storage) or ``"fake_quantized"`` (float weights
        holding the quantize-dequantize result).
    """

    weight_merge_groups: list[list[str]] | None = None
    kv_cache_group: list[str] = field(default_factory=list)
    min_kv_scale: float = 0.0
    pack_method: str = "reorder"
    weight_format: str = "real_quantized"

    def __post_init__(self) -> None:
        owner = "JsonExporterConfig"
        if self.pack_method not in PACK_METHODS:
            raise ValueError(f"{owner}.pack_method={self.pack_method!r} is not one of: {', '.join(PACK_METHODS)}")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"{owner}.weight_format={self.weight_format!r} is not one of: "
                             f"{', '.join(WEIGHT_FORMATS)}")
        self.min_kv_scale = check_min_kv_scale(owner, self.min_kv_scale)
        if not isinstance(self.kv_cache_group, list) or not all(isinstance(p, str) for p in self.kv_cache_group):
            raise ValueError(f"{owner}.kv_cache_group={self.kv_cache_group!r} must be a list of name patterns")
        groups = self.weight_merge_groups
        if groups is not None and (not isinstance(groups, list) or not all(
                isinstance(g, list) and g and all(isinstance(p, str) for p in g) for g in groups)):
            raise ValueError(f"{owner}.weight_merge_groups={groups!r} must be None or a list of non-empty "
                             "lists of name patterns")

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``quantization_config["export"]`` block (keys sorted as Quark writes them)."""
        return dict(sorted(asdict(self).items()))


@dataclass
class OnnxExporterConfig:
    """Settings of the ONNX export.

    :param opset_version: ONNX opset; ``None`` means 21, the first opset whose QuantizeLinear /
        DequantizeLinear take int4/uint4 and blocked (per-group) scales. Lower opsets are refused.
    """

    opset_version: int | None = None

    def __post_init__(self) -> None:
        if self.opset_version is not None and (isinstance(self.opset_version, bool)
                                               or not isinstance(self.opset_version, int) or self.opset_version < 21):
            raise ValueError(f"OnnxExporterConfig.opset_version={self.opset_version!r} must be None or an int >= 21")


@dataclass
class ExporterConfig:
    """Settings of every export format: ``json_export_config`` (hf_format) and ``onnx_export_config``."""

    json_export_config: JsonExporterConfig = field(default_factory=JsonExporterConfig)
    onnx_export_config: OnnxExporterConfig = field(default_factory=OnnxExporterConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.json_export_config, JsonExporterConfig):
            raise ValueError(f"ExporterConfig.json_export_config={self.json_export_config!r} must be a "
                             "JsonExporterConfig")
        if not isinstance(self.onnx_export_config, OnnxExporterConfig):
            raise ValueError(f"ExporterConfig.onnx_export_config={self.onnx_export_config!r} must be an "
                             "OnnxExporterConfig")


__all__ = ["WEIGHT_FORMATS", "ExporterConfig", "JsonExporterConfig", "OnnxExporterConfig"]
