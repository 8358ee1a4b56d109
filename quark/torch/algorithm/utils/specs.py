"""Which weight spec each Linear of a decoder layer gets, via the config resolver (layer 6)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def weight_spec_for(full_name: str, module: nn.Module, quant_config: Any) -> Any | None:
    """The weight ``QuantizationSpec`` of ``module`` under ``quant_config`` (None when unquantized)."""
    from quark.torch.quantization.config.resolve import resolve_module_config

    resolved = resolve_module_config(full_name, module, quant_config)
    return None if resolved is None else getattr(resolved, "weight", None)


def set_weight_qparams(module: nn.Module, scale: Any, zero_point: Any, scale2: Any = None) -> bool:
    """Fix the module's weight quantizer to ``(scale, zero_point)`` when it has one; True if done.

    ``scale2``: the per-tensor scale of a two-stage quantizer's scale stage, fixed with it (the
    first stage's ``scale`` is then the one before that stage, as the quantizer stores it).
    """
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is None or not hasattr(quantizer, "set_qparams"):
        return False
    quantizer.set_qparams(scale, zero_point)
    second = getattr(quantizer, "scale_quantizer", None)
    if scale2 is not None and second is not None:
        second.set_qparams(scale2, torch.zeros_like(scale2))
    return True


def refresh_weight_qparams(layer: nn.Module) -> None:
    """Re-derive weight/bias qparams of every quantized linear in ``layer`` from its current tensors.

    QuantLinear calibrates its weight quantizer when it is inserted; an algorithm that changes the
    weights afterwards (AWQ scaling and clipping) must refresh them. Fixed qparams are kept.
    """
    for m in layer.modules():
        for attr, tensor_name in (("weight_quantizer", "weight"), ("bias_quantizer", "bias")):
            quantizer = getattr(m, attr, None)
            tensor = getattr(m, tensor_name, None)
            if quantizer is None or tensor is None or getattr(quantizer, "qparams_fixed", False):
                continue
            if hasattr(quantizer, "calibrate_from"):
                quantizer.calibrate_from(tensor.detach())
