"""The native fp8 layout (``quant_method: "fp8"``): per-tensor fp8 e4m3 weights and activations.

Names: vLLM reads ``weight_scale`` / ``input_scale`` and KV scales ``self_attn.k_scale`` /
``v_scale``; transformers' ``FineGrainedFP8`` reads ``weight_scale_inv`` / ``activation_scale``.
``scale_names`` picks one (``"vllm"`` by default, the reference's naming).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from quark.torch.export.config.config import JsonExporterConfig
from quark.torch.export.custom.routing import convert_per_module
from quark.torch.export.hf_format.writer import check_exportable, matches_any
from quark.torch.quantization.config.config import Config, QuantizationSpec
from quark.torch.quantization.config.resolve import is_quantizable
from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear

logger = logging.getLogger(__name__)
SCALE_NAMES = {"vllm": ("weight_scale", "input_scale"), "transformers": ("weight_scale_inv", "activation_scale")}


def is_fp8_per_tensor(spec: Any) -> bool:
    """True for an fp8_e4m3 per-tensor spec (the only one this layout holds)."""
    return isinstance(spec, QuantizationSpec) and spec.dtype == Dtype.fp8_e4m3 \
        and (spec.qscheme or QSchemeType.per_tensor) == QSchemeType.per_tensor


def _check_module(name: str, module: QuantLinear, kv: bool) -> None:
    cfg = module.quant_config
    problems = []
    if cfg is None or not is_fp8_per_tensor(cfg.weight):
        problems.append("weight must be fp8_e4m3 per_tensor")
    if cfg is not None and cfg.input_tensors is not None and not is_fp8_per_tensor(cfg.input_tensors):
        problems.append("input_tensors must be None or fp8_e4m3 per_tensor")
    if cfg is not None and cfg.output_tensors is not None and not (kv and is_fp8_per_tensor(cfg.output_tensors)):
        problems.append("output_tensors is only allowed on KV-cache layers (fp8_e4m3 per_tensor)")
    if cfg is not None and cfg.bias is not None:
        problems.append("bias quantization is not part of the fp8 layout")
    if module.input_rotation is not None:
        problems.append("online rotations are not part of the fp8 layout")
    if problems:
        raise ValueError(f"custom_mode='fp8' cannot hold layer {name}: {'; '.join(problems)}. The fp8 layout "
                         "supports fp8_e4m3 per-tensor weights, optional fp8 per-tensor static/dynamic "
                         "activations and fp8 KV-cache scales; use custom_mode='quark' for other schemes")


def fp8_quantization_config(config: Config, ignored: list[str] | None = None) -> dict[str, Any]:
    """``quantization_config`` of the fp8 layout for ``config`` (raises when it is not fp8 per-tensor)."""
    glob = config.global_quant_config
    if not is_fp8_per_tensor(glob.weight):
        raise ValueError("the fp8 layout needs an fp8_e4m3 per_tensor weight in global_quant_config")
    inp = glob.input_tensors
    if inp is not None and not is_fp8_per_tensor(inp):
        raise ValueError("the fp8 layout needs fp8_e4m3 per_tensor input_tensors (or none)")
    scheme = "static" if inp is not None and not inp.is_dynamic else "dynamic"
    out: dict[str, Any] = {"quant_method": "fp8", "activation_scheme": scheme, "weight_block_size": None,
                           "ignored_layers": list(ignored if ignored is not None else config.exclude)}
    if config.kv_cache_quant_config:
        out["kv_cache_scheme"] = "static"
    return out


def fp8_checkpoint(model: nn.Module, config: Config, json_cfg: JsonExporterConfig,
                   scale_names: str = "vllm") -> tuple[Iterable[tuple[str, torch.Tensor]], dict[str, Any]]:
    if scale_names not in SCALE_NAMES:
        raise ValueError(f"fp8_scale_names={scale_names!r} is not one of: {', '.join(SCALE_NAMES)}")
    w_name, a_name = SCALE_NAMES[scale_names]
    modules = check_exportable(model)
    kv_group = json_cfg.kv_cache_group
    for name, module in modules.items():
        _check_module(name, module, bool(kv_group) and matches_any(name, kv_group))
    ignored = [n for n, m in model.named_modules() if is_quantizable(m) and n not in modules]
    qc = fp8_quantization_config(config, ignored)
    if qc["activation_scheme"] == "dynamic" and any(
            m.input_quantizer is not None and not m.input_quantizer.is_dynamic for m in modules.values()):
        raise ValueError("custom_mode='fp8': some layers have static and others dynamic fp8 activations; the "
                         "layout has one activation_scheme")

    def convert(mod_name: str, module: QuantLinear, suffix: str, tensor: torch.Tensor
                ) -> list[tuple[str, torch.Tensor]]:
        if suffix == "weight_scale":
            return [(f"{mod_name}.{w_name}", tensor)]
        if suffix == "input_scale":
            return [(f"{mod_name}.{a_name}", tensor)]
        if suffix != "output_scale":
            return [(f"{mod_name}.{suffix}", tensor)]
        if scale_names == "transformers":
            logger.warning("%s.%s: transformers' fp8 layout has no KV-cache scale; not written", mod_name, suffix)
            return []
        parent, _, leaf = mod_name.rpartition(".")
        which = "k" if leaf.startswith("k") else "v" if leaf.startswith("v") else None
        if which is None:
            raise ValueError(f"custom_mode='fp8': cannot tell whether {mod_name} is the key or the value "
                             "projection (KV scales need names starting with k or v)")
        return [(f"{parent}.{which}_scale", tensor)]

    out = convert_per_module(model, json_cfg, convert)
    return out, qc


__all__ = ["SCALE_NAMES", "fp8_checkpoint", "fp8_quantization_config", "is_fp8_per_tensor"]
