"""The AutoAWQ GEMM layout (``quant_method: "awq"``): ``qweight`` / ``qzeros`` / ``scales``.

``qweight`` int32 [in, out/8] and ``qzeros`` int32 [in/g, out/8] hold unsigned 4-bit codes, 8 per
word in AutoAWQ's order (logical column ``8c + [0, 2, 4, 6, 1, 3, 5, 7][i]`` in nibble ``i``, which
is Quark's ``"reorder"``); ``scales`` float16 [in/g, out]. Signed int4 codes are shifted by 8
(zero point 8), so ``w = (q - z) * s`` holds for both.
"""

from __future__ import annotations

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


def _awq_spec(spec: Any) -> bool:
    return isinstance(spec, QuantizationSpec) and spec.dtype in (Dtype.int4, Dtype.uint4) \
        and spec.qscheme == QSchemeType.per_group and spec.ch_axis in (-1, 1) and not spec.is_dynamic


def awq_quantization_config(config: Config, ignored: list[str] | None = None) -> dict[str, Any]:
    glob = config.global_quant_config
    if not _awq_spec(glob.weight) or glob.input_tensors is not None or glob.output_tensors is not None:
        raise ValueError("the awq layout needs int4/uint4 per_group static weights and no activation quantization")
    return {"quant_method": "awq", "bits": 4, "group_size": glob.weight.group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": list(ignored if ignored is not None else config.exclude)}


def _check(name: str, module: QuantLinear, group: int) -> None:
    cfg = module.quant_config
    ok = cfg is not None and _awq_spec(cfg.weight) and cfg.weight.group_size == group \
        and cfg.input_tensors is None and cfg.output_tensors is None and cfg.bias is None \
        and module.input_rotation is None
    if not ok:
        raise ValueError(f"custom_mode='awq' cannot hold layer {name}: the AutoAWQ layout supports int4/uint4 "
                         f"per_group (group {group}, one group size for the whole model) weight-only "
                         "quantization; use custom_mode='quark' for other schemes")


def _unsigned_codes(packed: torch.Tensor, n: int, signed: bool, order: str) -> torch.Tensor:
    codes = formats.unpack_int32(packed, n, bits=4, signed=signed, order=order)
    return codes.to(torch.int32) + (8 if signed else 0)


def awq_checkpoint(model: nn.Module, config: Config, json_cfg: JsonExporterConfig
                   ) -> tuple[Iterable[tuple[str, torch.Tensor]], dict[str, Any]]:
    modules = check_exportable(model)
    ignored = [n for n, m in model.named_modules() if is_quantizable(m) and n not in modules]
    qc = awq_quantization_config(config, ignored)
    for name, module in modules.items():
        _check(name, module, qc["group_size"])
    order = json_cfg.pack_method

    def convert(mod_name: str, module: QuantLinear, suffix: str, tensor: torch.Tensor
                ) -> list[tuple[str, torch.Tensor]]:
        signed = module.weight_quantizer.spec.dtype == Dtype.int4
        if suffix in ("weight", "weight_zero_point"):
            codes = _unsigned_codes(tensor, module.out_features, signed, order)
            new = "qweight" if suffix == "weight" else "qzeros"
            return [(f"{mod_name}.{new}", formats.pack_int32(codes, bits=4, order="reorder"))]
        if suffix == "weight_scale":
            return [(f"{mod_name}.scales", tensor.to(torch.float16))]
        return [(f"{mod_name}.{suffix}", tensor)]

    out = convert_per_module(model, json_cfg, convert)
    return out, qc


__all__ = ["awq_checkpoint", "awq_quantization_config"]
