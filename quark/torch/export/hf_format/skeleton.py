"""Frozen ``QuantLinear`` skeletons: the modules a checkpoint is loaded into.

``build_skeletons(model, config, pack_method)`` replaces every ``nn.Linear`` that ``config``
quantizes by a *frozen* ``QuantLinear`` whose weight, scales and zero points already have the
storage shapes and dtypes of the checkpoint (computed by packing on the meta device, so no memory
is used and the shapes come from the one layout definition in ``weight_layout``). Loading is then a
rename plus a tensor assignment; this is what transformers' quark integration relies on
(``_map_to_quark`` runs before it loads the weights).
"""

from __future__ import annotations

import copy
import json
import logging

import torch
from torch import nn

from quark.torch.quantization.config.config import Config, QuantizationConfig
from quark.torch.quantization.config.resolve import is_quantizable, resolve
from quark.torch.quantization.config.type import QSchemeType
from quark.torch.quantization.formats import param_shape
from quark.torch.quantization.moe_experts import unfuse_experts
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
from quark.torch.quantization.tensor_quantize import FakeQuantize

logger = logging.getLogger(__name__)
META = torch.device("meta")
_TEMPLATES: dict[tuple, QuantLinear] = {}


def _static_qparams(quantizer: FakeQuantize, shape: tuple[int, ...]) -> None:
    """Give a static int/float quantizer placeholder qparams of the shape its observer produces."""
    spec = quantizer.spec
    if quantizer.needs_qparams and not quantizer.is_dynamic:
        pshape = param_shape(shape, spec.qscheme or QSchemeType.per_tensor, spec.ch_axis, spec.group_size)
        zp = torch.zeros(pshape, dtype=torch.int32) if quantizer.kind == "int" else None
        quantizer.set_qparams(torch.ones(pshape, dtype=torch.float32), zp)
    second = quantizer.scale_quantizer
    if second is not None and quantizer.needs_qparams:
        scale_shape = tuple(quantizer.scale.shape) if quantizer.scale is not None else tuple(
            param_shape(shape, spec.qscheme or QSchemeType.per_tensor, spec.ch_axis, spec.group_size))
        _static_qparams(second, scale_shape)


def _template(in_features: int, out_features: int, bias: bool, qconfig: QuantizationConfig,
              pack_method: str, float_dtype: torch.dtype) -> QuantLinear:
    """A frozen meta-device QuantLinear, made by freezing a zero weight on CPU once per signature.

    The pack functions check their data (NaN, ranges), which meta tensors cannot answer, so the
    storage shapes come from a real zero weight; the result is moved to ``meta`` and cached.
    """
    key = (in_features, out_features, bias, json.dumps(qconfig.to_dict(), sort_keys=True), pack_method,
           str(float_dtype))
    cached = _TEMPLATES.get(key)
    if cached is None:
        # transformers builds models under `with torch.device("meta")`; the template needs real tensors
        with torch.device("cpu"):
            module = QuantLinear(in_features, out_features, bias=bias, quant_config=qconfig, dtype=float_dtype)
            with torch.no_grad():
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
            module.float_dtype = float_dtype
            shapes = {"input_quantizer": (1, in_features), "output_quantizer": (1, out_features),
                      "weight_quantizer": (out_features, in_features), "bias_quantizer": (out_features,)}
            for attr, shape in shapes.items():
                quantizer = getattr(module, attr)
                if quantizer is not None:
                    _static_qparams(quantizer, shape)
            module.freeze(pack_method)
            _checkpoint_dtypes(module)
        cached = module.to(META)
        if len(_TEMPLATES) > 64:
            _TEMPLATES.clear()
        _TEMPLATES[key] = cached
    return copy.deepcopy(cached)


def _checkpoint_dtypes(module: QuantLinear) -> None:
    """Make the skeleton hold what the checkpoint holds (float formats carry no zero point)."""
    for first in module.quantizers():
        for quantizer in (first, first.scale_quantizer):
            if quantizer is not None and quantizer.kind == "float":
                quantizer.zero_point = None  # float formats: the checkpoint carries no zero point


def skeleton_linear(name: str, linear: nn.Linear, qconfig: QuantizationConfig, pack_method: str,
                    dtype: torch.dtype | None = None) -> QuantLinear:
    """A frozen, meta-device ``QuantLinear`` with the checkpoint storage of ``linear`` under ``qconfig``."""
    float_dtype = dtype or (linear.weight.dtype if linear.weight.is_floating_point() else torch.float32)
    module = _template(linear.in_features, linear.out_features, linear.bias is not None, qconfig,
                       pack_method, float_dtype)
    module.name = name
    for attr in ("input_quantizer", "weight_quantizer", "bias_quantizer", "output_quantizer"):
        quantizer = getattr(module, attr)
        if quantizer is not None:
            quantizer.name = f"{name}.{attr}"
    _carry_hooks(linear, module)
    return module


def _carry_hooks(source: nn.Module, target: nn.Module) -> None:
    for attr in ("_forward_pre_hooks", "_forward_hooks"):
        getattr(target, attr).update(getattr(source, attr))


def build_skeletons(model: nn.Module, config: Config, pack_method: str = "reorder",
                    dtype: torch.dtype | None = None) -> list[str]:
    """Replace each ``nn.Linear`` quantized by ``config`` with a frozen skeleton; return their names.

    Fused MoE experts are unfused first: our checkpoints hold per-expert Linears
    (``experts.<e>.gate_proj`` ...).
    """
    unfuse_experts(model)
    names: list[str] = []
    targets = [(n, m) for n, m in model.named_modules()
               if is_quantizable(m) and not isinstance(m, QuantLinear)]
    for name, linear in targets:
        qconfig = resolve(name, linear, config).config
        if qconfig is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, skeleton_linear(name, linear, qconfig, pack_method, dtype))
        names.append(name)
    if not names:
        logger.warning("the quantization config matched no nn.Linear of %s", type(model).__name__)
    return names


__all__ = ["build_skeletons", "skeleton_linear"]
