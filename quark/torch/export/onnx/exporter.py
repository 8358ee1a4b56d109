"""ONNX export of a quantized model: QuantizeLinear/DequantizeLinear pairs on weights and activations.

Each ``QuantLinear`` is traced with an export-only forward in which every quantizer becomes a
Q/DQ pair (opset 21: int8/uint8/int4/uint4/fp8 e4m3/e5m2; per-tensor, per-channel and blocked
per-group scales). Weights stay quantizable in the graph (Q/DQ on the dequantized weight values,
which Q maps back to the exact integer codes), dynamic per-tensor symmetric activations compute
their scale in the graph, and fp16/bf16 cast specs become Cast nodes. Formats with no ONNX
operator (OCP MX, MX6/MX9, BFP16, int2, fp4/fp6) are refused with the list of supported ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quark.torch.quantization import formats
from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.formats.table import format_info
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
from quark.torch.quantization.nn.modules.weight_layout import layout_of
from quark.torch.quantization.tensor_quantize import FakeQuantize

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 21
# (dequantized weight, scale, zero point) per QuantLinear while onnx_mode is active
_WEIGHTS: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
# ONNX TensorProto data types of the quantized element types
ONNX_TYPES = {Dtype.int8: 3, Dtype.uint8: 2, Dtype.int4: 22, Dtype.uint4: 21, Dtype.fp8_e4m3: 17,
              Dtype.fp8_e5m2: 19}
SUPPORTED = ("int8, uint8, int4, uint4, fp8_e4m3, fp8_e5m2 (weights: per_tensor, per_channel on the output "
             "axis, per_group along the input axis; activations: static per_tensor, or dynamic per_tensor "
             "symmetric), float16 / bfloat16 casts")


class _QDQ(torch.autograd.Function):
    """Fake quantization in PyTorch, QuantizeLinear -> DequantizeLinear in ONNX."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype_name: str,
                axis: int, block: int) -> torch.Tensor:
        dtype = Dtype[dtype_name]
        qscheme = QSchemeType.per_group if block else (
            QSchemeType.per_channel if scale.dim() > 0 else QSchemeType.per_tensor)
        zp = zero_point if format_info(dtype).kind == "int" else None
        return formats.fake_quantize(x, scale, zp, dtype, qscheme=qscheme, ch_axis=axis,
                                     group_size=block or None)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, zero_point: Any, dtype_name: str, axis: int, block: int) -> Any:
        # int4/uint4 are unknown to the TorchScript exporter's type inference: a placeholder op in
        # our domain carries the target type and becomes a Cast in _finish_graph.
        zp = g.op("quark::ZeroPoint", zero_point, to_i=ONNX_TYPES[Dtype[dtype_name]])
        zp.setType(zero_point.type())
        attrs: dict[str, int] = {}
        if block:
            attrs = {"axis_i": axis, "block_size_i": block}
        elif axis is not None:
            attrs = {"axis_i": axis}
        q = g.op("QuantizeLinear", x, scale, zp, **attrs)
        return g.op("DequantizeLinear", q, scale, zp, **attrs)


def _unsupported(owner: str, why: str) -> ValueError:
    return ValueError(f"ONNX export cannot represent {owner}: {why}. Supported: {SUPPORTED}")


def _zero(spec_dtype: Dtype, zero_point: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if zero_point is not None and format_info(spec_dtype).kind == "int":
        return zero_point.to(torch.int32).reshape(like.shape)
    return torch.zeros(like.shape, dtype=torch.int32 if format_info(spec_dtype).kind == "int" else torch.float32)


def _check_spec(owner: str, quantizer: FakeQuantize) -> None:
    spec = quantizer.spec
    if quantizer.kind == "cast":
        return
    if spec.dtype not in ONNX_TYPES or quantizer.kind not in ("int", "float"):
        raise _unsupported(owner, f"dtype {spec.dtype.name}"
                                  f"{' (' + spec.scale_format + ' scales)' if spec.scale_format else ''}")
    if quantizer.scale_quantizer is not None:
        raise _unsupported(owner, "two-stage (quantized) scales")


def _activation(owner: str, quantizer: FakeQuantize | None, x: torch.Tensor) -> torch.Tensor:
    if quantizer is None or not quantizer.fake_quant_enabled:
        return x
    _check_spec(owner, quantizer)
    spec = quantizer.spec
    if quantizer.kind == "cast":
        return x.to(format_info(spec.dtype).torch_dtype).to(x.dtype)
    if (spec.qscheme or QSchemeType.per_tensor) != QSchemeType.per_tensor:
        raise _unsupported(owner, f"{spec.qscheme.name} activations")
    info = format_info(spec.dtype)
    if quantizer.is_dynamic:
        if spec.symmetric is False:
            raise _unsupported(owner, "dynamic asymmetric activations")
        if spec.scale_type is not None and spec.scale_type.name != "float":
            raise _unsupported(owner, f"dynamic activations with scale_type {spec.scale_type.name}")
        # the observers' symmetric rule (observer.range_to_qparams), computed in the graph
        divisor = (info.qmax - info.qmin) / 2 if info.kind == "int" else info.qmax
        scale = (x.detach().abs().amax().float() / float(divisor)).clamp(min=torch.finfo(torch.float32).eps)
        zero_point = torch.zeros((), dtype=torch.int32 if info.kind == "int" else torch.float32)
    else:
        scale, zero_point = quantizer.scale.reshape(()), _zero(spec.dtype, quantizer.zero_point,
                                                             quantizer.scale.reshape(()))
    return _QDQ.apply(x, scale.to(x.dtype), zero_point, spec.dtype.name, 0, 0)


def _canonical_weight_qparams(module: QuantLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero_point) in the canonical [out] / [out, in/g] shape, from frozen storage or not."""
    wq = module.weight_quantizer
    scale, zero_point = wq.scale, wq.zero_point
    if not module.frozen:
        return scale, zero_point
    layout = layout_of(wq.spec)
    signed = format_info(wq.spec.dtype).signed
    if layout == "int4_group":
        scale = scale.t()
        if zero_point is not None:
            zero_point = formats.unpack_int32(zero_point, module.out_features, bits=4, signed=signed,
                                              order=module.pack_method).t()
    elif layout == "int4_channel" and zero_point is not None:
        zero_point = formats.unpack_int32(zero_point, module.out_features, bits=4, signed=signed,
                                          order=module.pack_method)
    return scale, zero_point


def _weight(name: str, module: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    wq = module.weight_quantizer
    if wq is None:
        return module.weight.to(dtype)
    owner = f"{name}.weight_quantizer"
    _check_spec(owner, wq)
    w, scale, zero_point = _WEIGHTS[id(module)]
    w = w.to(dtype)
    if wq.kind == "cast":
        return w
    spec = wq.spec
    qscheme = spec.qscheme or QSchemeType.per_tensor
    axis, block = 0, 0
    if qscheme == QSchemeType.per_channel:
        if spec.ch_axis not in (0, -2):
            raise _unsupported(owner, f"per_channel weights on ch_axis={spec.ch_axis}")
    elif qscheme == QSchemeType.per_group:
        if spec.ch_axis not in (1, -1):
            raise _unsupported(owner, f"per_group weights on ch_axis={spec.ch_axis}")
        axis, block = 1, int(spec.group_size)
    return _QDQ.apply(w, scale.to(dtype), _zero(spec.dtype, zero_point, scale), spec.dtype.name, axis, block)


def _onnx_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if self.input_rotation is not None:
        n = self.input_rotation.shape[0]
        x = (x @ self.input_rotation.to(x.dtype)) / math.sqrt(n)
    x = _activation(f"{self.name}.input_quantizer", self.input_quantizer, x)
    bias = self.bias
    if bias is not None:
        bias = bias.to(x.dtype)
        if self.bias_quantizer is not None:
            bias = _activation(f"{self.name}.bias_quantizer", self.bias_quantizer, bias)
    out = F.linear(x, _weight(self.name, self, x.dtype), bias)
    return _activation(f"{self.name}.output_quantizer", self.output_quantizer, out)


@contextlib.contextmanager
def onnx_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily give every QuantLinear the export forward (restored on exit)."""
    owned = {id(q) for m in model.modules() if isinstance(m, QuantLinear) for q in m.quantizers()}
    stray = [n for n, m in model.named_modules() if isinstance(m, FakeQuantize) and id(m) not in owned
             and ".scale_quantizer" not in n and m.fake_quant_enabled]
    if stray:
        raise ValueError(f"ONNX export handles the quantizers of QuantLinear layers only; these are not: "
                         f"{stray[:5]} (KV-cache / attention quantizers have no ONNX export here)")
    patched = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            module.name = module.name or name
            wq = module.weight_quantizer
            if wq is not None:
                # computed outside the trace, so the graph holds them as constants (not the unpacking)
                with torch.no_grad():
                    weight = module.quantized_weight(torch.float32)
                    qparams = _canonical_weight_qparams(module) if wq.needs_qparams else (None, None)
                _WEIGHTS[id(module)] = (weight, *qparams)
            module.forward = types.MethodType(_onnx_forward, module)  # type: ignore[method-assign]
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
            _WEIGHTS.pop(id(module), None)


class CausalLMLogits(nn.Module):
    """``input_ids -> logits`` of a transformers causal LM (full attention mask, no cache)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def _finish_graph(path: Path) -> None:
    """Turn the ``quark::ZeroPoint`` placeholders into ``Cast`` nodes and check the model."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    retyped: set[str] = set()
    for node in model.graph.node:
        if node.domain == "quark" and node.op_type == "ZeroPoint":
            node.domain = ""
            node.op_type = "Cast"
            retyped.update(node.output)
        elif node.op_type == "QuantizeLinear":
            retyped.update(node.output)
    # the exporter recorded the placeholder types; drop them so the real types are inferred
    infos = [v for v in model.graph.value_info if v.name not in retyped]
    del model.graph.value_info[:]
    model.graph.value_info.extend(infos)
    kept = [op for op in model.opset_import if op.domain != "quark"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def export_onnx(model: nn.Module, input_args: Any, path: Path, opset_version: int | None = None,
                input_names: list[str] | None = None, output_names: list[str] | None = None,
                verbose: bool = False, do_constant_folding: bool = True) -> Path:
    """Trace ``model`` with Q/DQ quantizers into ``path`` (TorchScript-based ``torch.onnx.export``)."""
    opset = opset_version or DEFAULT_OPSET
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset_version={opset} is too old: int4/uint4 and blocked QuantizeLinear need >= 21")
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no quantized layer: quantize it with "
                         "ModelQuantizer(config).quantize_model(model, dataloader) before exporting")
    for m in model.modules():
        for q in m.quantizers() if isinstance(m, QuantLinear) else []:
            if q.observing:
                raise ValueError(f"{q.name}: still calibrating; finish ModelQuantizer.quantize_model first")
    is_lm = hasattr(model, "config") and hasattr(model, "get_input_embeddings")
    target: nn.Module = CausalLMLogits(model) if is_lm else model
    args = input_args if isinstance(input_args, tuple) else (input_args,)
    names_in = input_names or (["input_ids"] if is_lm else [f"input_{i}" for i in range(len(args))])
    names_out = output_names or (["logits"] if is_lm else ["output"])
    dynamic = {names_in[0]: {0: "batch", 1: "sequence"}, names_out[0]: {0: "batch", 1: "sequence"}} if is_lm else None
    config = getattr(model, "config", None)
    old_attn = getattr(config, "_attn_implementation", None)
    was_training = model.training
    model.eval()
    try:
        if config is not None and old_attn is not None:
            config._attn_implementation = "eager"
        with onnx_mode(model), torch.no_grad():
            torch.onnx.export(target, args, str(path), opset_version=opset, dynamo=False, verbose=verbose,
                              input_names=names_in, output_names=names_out, dynamic_axes=dynamic,
                              do_constant_folding=do_constant_folding)
    finally:
        if config is not None and old_attn is not None:
            config._attn_implementation = old_attn
        model.train(was_training)
    _finish_graph(path)
    logger.info("exported ONNX model to %s (opset %d)", path, opset)
    return path


__all__ = ["DEFAULT_OPSET", "ONNX_TYPES", "SUPPORTED", "CausalLMLogits", "export_onnx", "onnx_mode"]
