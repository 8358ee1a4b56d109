"""The compressed-tensors layout (vLLM / llm-compressor): FP8, W8A8 int8 and W4A16 int4.

=================  ==================  ===============================================
scheme             format              tensors per Linear
=================  ==================  ===============================================
fp8 e4m3           float-quantized     ``weight`` F8, ``weight_scale`` [1] / [out, 1], ``input_scale`` [1]
int8 (W8A8)        int-quantized       ``weight`` I8, ``weight_scale``, ``input_scale`` (+ zero points if asymmetric)
int4 sym (W4A16)   pack-quantized      ``weight_packed`` I32 [out, in/8], ``weight_scale`` [out, in/g], ``weight_shape``
=================  ==================  ===============================================

``pack-quantized`` stores signed codes plus 8, eight per int32 along the input axis in plain order.
One quantization config must cover every quantized Linear (one ``config_group``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from quark.torch.export.config.config import JsonExporterConfig
from quark.torch.export.custom.routing import convert_per_module
from quark.torch.export.hf_format.writer import check_exportable
from quark.torch.quantization import formats
from quark.torch.quantization.config.config import Config, QuantizationSpec
from quark.torch.quantization.config.resolve import is_quantizable
from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear

SUPPORTED = ("fp8_e4m3 weights (per_tensor / per_channel) with optional fp8 per_tensor activations; int8 "
             "weights (per_tensor / per_channel) with optional int8 per_tensor activations; symmetric int4 "
             "per_group weight-only")
_STRATEGY = {QSchemeType.per_tensor: "tensor", QSchemeType.per_channel: "channel", QSchemeType.per_group: "group"}


def _args(owner: str, spec: QuantizationSpec | None, weight: bool) -> dict[str, Any] | None:
    if spec is None:
        return None
    ok_dtypes = (Dtype.fp8_e4m3, Dtype.int8, Dtype.int4) if weight else (Dtype.fp8_e4m3, Dtype.int8)
    qscheme = spec.qscheme or QSchemeType.per_tensor
    if spec.dtype not in ok_dtypes or qscheme not in _STRATEGY or (not weight and qscheme != QSchemeType.per_tensor):
        raise ValueError(f"compressed-tensors cannot hold {owner} ({spec.dtype.name} {qscheme.name}); "
                         f"supported: {SUPPORTED}")
    if qscheme == QSchemeType.per_channel and spec.ch_axis not in (0, -2):
        raise ValueError(f"compressed-tensors: {owner} per_channel must be on the output axis (ch_axis 0)")
    if spec.dtype == Dtype.int4 and (qscheme != QSchemeType.per_group or spec.symmetric is False):
        raise ValueError(f"compressed-tensors: {owner} int4 must be symmetric per_group; supported: {SUPPORTED}")
    return {"num_bits": 4 if spec.dtype == Dtype.int4 else 8,
            "type": "float" if spec.dtype == Dtype.fp8_e4m3 else "int",
            "symmetric": spec.symmetric is not False, "group_size": spec.group_size,
            "strategy": _STRATEGY[qscheme], "block_structure": None, "dynamic": bool(spec.is_dynamic),
            "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def _format(weight_args: dict[str, Any]) -> str:
    if weight_args["num_bits"] == 4:
        return "pack-quantized"
    return "float-quantized" if weight_args["type"] == "float" else "int-quantized"


def check_config_group(qconfig: Any) -> None:
    """``ValueError`` unless compressed-tensors' one config group can hold ``qconfig``."""
    if qconfig.output_tensors is not None or qconfig.bias is not None:
        raise ValueError(f"compressed-tensors cannot hold output/bias quantization; supported: {SUPPORTED}")
    if any(isinstance(s, (list, tuple)) for s in (qconfig.weight, qconfig.input_tensors)):
        raise ValueError(f"compressed-tensors cannot hold two-stage (quantized) scales; supported: {SUPPORTED}")
    weights = _args("weight", qconfig.weight, True)
    if weights is None:
        raise ValueError(f"compressed-tensors needs quantized weights; supported: {SUPPORTED}")
    if _format(weights) == "pack-quantized" and _args("input_tensors", qconfig.input_tensors, False) is not None:
        raise ValueError(f"compressed-tensors pack-quantized (int4) is weight-only; supported: {SUPPORTED}")


def compressed_tensors_checkpoint(model: nn.Module, config: Config, json_cfg: JsonExporterConfig
                                  ) -> tuple[Iterable[tuple[str, torch.Tensor]], dict[str, Any]]:
    modules = check_exportable(model)
    first = next(iter(modules.values())).quant_config
    for name, module in modules.items():
        if module.quant_config != first:
            raise ValueError(f"compressed-tensors export writes one config group: layer {name} is quantized "
                             "differently from the others")
        if module.output_quantizer is not None or module.bias_quantizer is not None \
                or module.input_rotation is not None:
            raise ValueError(f"compressed-tensors cannot hold layer {name}'s output/bias quantization or "
                             f"rotation; supported: {SUPPORTED}")
    weights = _args("weight", first.weight, True)
    if weights is None:
        raise ValueError(f"compressed-tensors needs quantized weights; supported: {SUPPORTED}")
    inputs = _args("input_tensors", first.input_tensors, False)
    fmt = _format(weights)
    if fmt == "pack-quantized" and inputs is not None:
        raise ValueError(f"compressed-tensors pack-quantized (int4) is weight-only; supported: {SUPPORTED}")
    ignored = [n for n, m in model.named_modules() if is_quantizable(m) and n not in modules]
    from compressed_tensors import __version__ as ct_version

    qc = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                                        "output_activations": None, "format": fmt}},
          "ignore": ignored, "kv_cache_scheme": None, "global_compression_ratio": None, "version": ct_version}
    out = convert_per_module(model, json_cfg, functools.partial(_convert, weights=weights,
                                                                pack_method=json_cfg.pack_method))
    return out, qc


def _convert(mod_name: str, module: QuantLinear, suffix: str, tensor: torch.Tensor,
             weights: dict[str, Any], pack_method: str) -> list[tuple[str, torch.Tensor]]:
    strategy = weights["strategy"]
    if weights["num_bits"] == 4:
        if suffix == "weight":
            codes = formats.unpack_int32(tensor, module.out_features, bits=4, signed=True, order=pack_method).t()
            packed = formats.pack_int32((codes.to(torch.int32) + 8).contiguous(), bits=4, order="order")
            shape = torch.tensor([module.out_features, module.in_features], dtype=torch.int64)
            return [(f"{mod_name}.weight_packed", packed), (f"{mod_name}.weight_shape", shape)]
        if suffix == "weight_scale":
            return [(f"{mod_name}.weight_scale", tensor.t().contiguous().to(module.float_dtype))]
        if suffix == "weight_zero_point":
            return []  # symmetric: compressed-tensors stores no zero point
        return [(f"{mod_name}.{suffix}", tensor)]
    if suffix.endswith("zero_point") and weights["symmetric"]:
        return []
    if suffix in ("weight_scale", "input_scale", "weight_zero_point", "input_zero_point"):
        if suffix.startswith("weight") and strategy == "channel":
            return [(f"{mod_name}.{suffix}", tensor.reshape(-1, 1))]
        return [(f"{mod_name}.{suffix}", tensor.reshape(1))]
    return [(f"{mod_name}.{suffix}", tensor)]


__all__ = ["SUPPORTED", "check_config_group", "compressed_tensors_checkpoint"]
