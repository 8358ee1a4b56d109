"""Mixture-of-experts support for the LLM tools (layer 10).

:func:`unfuse_experts` (re-exported from :mod:`quark.torch.quantization.moe_experts`, where export
and import use it too) turns transformers 5's fused experts modules into per-expert ``nn.Linear``
layers so that the experts are quantized, calibrated and exported like every other Linear.

:func:`prequantize_experts` is the first step of the MoE second-step recipe: each expert weight is
rounded in place to the first-step (global) weight spec; the expert Linears are then quantized a
second time by their own config (``schemes.add_moe_second_step``), so the effective weight is
``Q2(Q1(W))``.
"""

from __future__ import annotations

import logging
from fnmatch import fnmatchcase

import torch
from torch import nn

from quark.torch.quantization.config.config import Config
from quark.torch.quantization.moe_experts import ExpertMLP, UnfusedExperts, fused_expert_modules, unfuse_experts
from quark.torch.quantization.tensor_quantize import FakeQuantize

logger = logging.getLogger(__name__)

__all__ = ["ExpertMLP", "UnfusedExperts", "fused_expert_modules", "prequantize_experts", "unfuse_experts"]


@torch.no_grad()
def prequantize_experts(model: nn.Module, config: Config, patterns: tuple[str, ...]) -> list[str]:
    """First step of the MoE recipe: round each expert Linear's weight (names matching ``patterns``,
    not excluded) in place to ``config.global_quant_config.weight``; return the names touched."""
    spec = config.global_quant_config.weight
    if spec is None:
        return []
    touched = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not any(fnmatchcase(name, p) for p in patterns):
            continue
        if any(fnmatchcase(name, ex) for ex in config.exclude):
            continue
        quantizer = FakeQuantize(spec, name=f"{name}.first_step").to(module.weight.device)
        quantizer.calibrate_from(module.weight)
        module.weight.copy_(quantizer(module.weight))
        touched.append(name)
    if not touched:
        raise ValueError("--moe_experts_second_step_config: the model has no expert Linear (names matching "
                         f"{', '.join(patterns)}); it applies to mixture-of-experts models only")
    return touched
