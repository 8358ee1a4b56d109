"""ONNX export of a quantized model: QuantizeLinear/DequantizeLinear pairs on weights and activations.

Each ``QuantLinear`` is traced with an export-only forward (opset 21: int8/uint8/int4/uint4/fp8
e4m3/e5m2; per-tensor, per-channel and blocked per-group scales). Quantized weights are stored as
initializers of their own element type (INT8/UINT8, INT4/UINT4 two per byte, FLOAT8E4M3FN/E5M2)
feeding only a DequantizeLinear, so the file holds the low-bit weights; activations get
QuantizeLinear -> DequantizeLinear pairs, dynamic per-tensor symmetric ones computing their scale
in the graph, and fp16/bf16 cast specs become Cast nodes. Formats with no ONNX operator (OCP MX,
MX6/MX9, BFP16, int2, fp4/fp6) are refused with the list of supported ones.
"""

from __future__ import annotations

import contextlib
import logging
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quark.torch.quantization import formats
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType
from quark.torch.quantization.formats.table import format_info
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
from quark.torch.quantization.nn.modules.weight_layout import layout_of
from quark.torch.quantization.tensor_quantize import FakeQuantize

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 21


@dataclass
class _WeightConstants:
    """One QuantLinear's weight as the export graph takes it, computed outside the trace.

    ``codes`` (with ``scale``, ``zero_point`` and the DequantizeLinear ``axis``/``block``) for
    quantized weights, else ``weight`` (float; cast specs).
    """

    weight: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    axis: int = 0
    block: int = 0


# per QuantLinear (by id) while onnx_mode is active
_WEIGHTS: dict[int, _WeightConstants] = {}
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
        zp = zero_point if format_info(dtype).kind == "int" else None
        return formats.fake_quantize(x, scale, zp, dtype, qscheme=_qscheme(scale, block), ch_axis=axis,
                                     group_size=block or None)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, zero_point: Any, dtype_name: str, axis: int, block: int) -> Any:
        # int4/uint4 are unknown to the TorchScript exporter's type inference: a placeholder op in
        # our domain carries the target type and becomes a Cast in _finish_graph.
        zp = g.op("quark::ZeroPoint", zero_point, to_i=ONNX_TYPES[Dtype[dtype_name]])
        zp.setType(zero_point.type())
        attrs = _axis_attrs(axis, block)
        q = g.op("QuantizeLinear", x, scale, zp, **attrs)
        return g.op("DequantizeLinear", q, scale, zp, **attrs)


class _DQ(torch.autograd.Function):
    """Dequantization of constant weight codes in PyTorch, DequantizeLinear of an initializer in ONNX.

    ``codes`` (and integer zero points) are int8/uint8 (int4/uint4 too) or float8 tensors; the
    ``quark::Codes`` placeholder records the element type and :func:`_finish_graph` turns the
    initializer into one of that type (packing int4/uint4 two per byte).
    """

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype_name: str,
                axis: int, block: int, weight_name: str) -> torch.Tensor:
        dtype = Dtype[dtype_name]
        zp = zero_point if format_info(dtype).kind == "int" else None
        return formats.dequantize(codes, scale, zp, dtype, qscheme=_qscheme(scale, block), ch_axis=axis,
                                  group_size=block or None, out_dtype=scale.dtype)

    @staticmethod
    def symbolic(g: Any, codes: Any, scale: Any, zero_point: Any, dtype_name: str, axis: int, block: int,
                 weight_name: str) -> Any:
        dtype = Dtype[dtype_name]
        typed = g.op("quark::Codes", codes, to_i=ONNX_TYPES[dtype], name_s=weight_name)
        typed.setType(codes.type())
        if format_info(dtype).kind != "int":  # float formats: no zero point (DequantizeLinear's default 0)
            return g.op("DequantizeLinear", typed, scale, **_axis_attrs(axis, block))
        zp = g.op("quark::Codes", zero_point, to_i=ONNX_TYPES[dtype], name_s=f"{weight_name}_zero_point")
        zp.setType(zero_point.type())
        return g.op("DequantizeLinear", typed, scale, zp, **_axis_attrs(axis, block))


def _qscheme(scale: torch.Tensor, block: int) -> QSchemeType:
    if block:
        return QSchemeType.per_group
    return QSchemeType.per_channel if scale.dim() > 0 else QSchemeType.per_tensor


def _axis_attrs(axis: int | None, block: int) -> dict[str, int]:
    if block:
        return {"axis_i": int(axis or 0), "block_size_i": block}
    return {} if axis is None else {"axis_i": axis}


def _unsupported(owner: str, why: str) -> ValueError:
    return ValueError(f"ONNX export cannot represent {owner}: {why}. Supported: {SUPPORTED}")


def _zero(spec_dtype: Dtype, zero_point: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if zero_point is not None and format_info(spec_dtype).kind == "int":
        return zero_point.to(torch.int32).reshape(like.shape)
    return torch.zeros(like.shape, dtype=torch.int32 if format_info(spec_dtype).kind == "int" else torch.float32)


def spec_problem(spec: Any) -> str | None:
    """Why ONNX export cannot represent ``spec`` (a spec or a two-stage list), or None."""
    if isinstance(spec, (list, tuple)):
        return "two-stage (quantized) scales" if len(spec) > 1 else spec_problem(spec[0]) if spec else None
    if spec.kind == "cast":
        return None
    if spec.dtype not in ONNX_TYPES or spec.kind not in ("int", "float"):
        return f"dtype {spec.dtype.name}{' (' + spec.scale_format + ' scales)' if spec.scale_format else ''}"
    return None


def _check_spec(owner: str, quantizer: FakeQuantize) -> None:
    problem = spec_problem(quantizer.spec)
    if problem is None and quantizer.kind != "cast" and quantizer.scale_quantizer is not None:
        problem = "two-stage (quantized) scales"
    if problem is not None:
        raise _unsupported(owner, problem)


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


def _weight_constants(name: str, module: QuantLinear) -> _WeightConstants:
    """Codes, scale and zero point of ``module``'s weight (checked: they reproduce its quantized weight)."""
    wq = module.weight_quantizer
    owner = f"{name}.weight_quantizer"
    _check_spec(owner, wq)
    weight = module.quantized_weight(torch.float32)
    if wq.kind == "cast":
        return _WeightConstants(weight=weight)
    spec = wq.spec
    axis, block = _weight_axis(owner, wq)
    scale, zero_point = _canonical_weight_qparams(module)
    scale = scale.float()
    zero = _zero(spec.dtype, zero_point, scale)
    int_zp = zero if wq.kind == "int" else None
    if int_zp is not None:  # stored in the weight's element type, like the codes
        zero = zero.to(torch.int8 if format_info(spec.dtype).signed else torch.uint8)
    qscheme = _qscheme(scale, block)
    # frozen: re-quantizing the dequantized storage gives back its codes exactly (checked); not
    # frozen: the codes freeze() would store, from the float weight (exact in float32 arithmetic)
    source = weight if module.frozen else module.weight.detach().float()
    codes = formats.quantize(source, scale, int_zp, spec.dtype, qscheme=qscheme, ch_axis=axis,
                             group_size=block or None, round_method=spec.round_method or RoundType.half_even)
    if module.frozen:
        back = formats.dequantize(codes, scale, int_zp, spec.dtype, qscheme=qscheme, ch_axis=axis,
                                  group_size=block or None)
        if not torch.equal(back, weight):
            raise RuntimeError(f"{owner}: the weight codes do not reproduce the stored weight (internal error)")
    return _WeightConstants(codes=codes, scale=scale, zero_point=zero, axis=axis, block=block)


def _weight(module: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    if module.weight_quantizer is None:
        return module.weight.to(dtype)
    c = _WEIGHTS[id(module)]
    if c.codes is None:
        return c.weight.to(dtype)
    return _DQ.apply(c.codes, c.scale.to(dtype), c.zero_point, module.weight_quantizer.spec.dtype.name,
                     c.axis, c.block, f"{module.name}.weight")


def _weight_axis(owner: str, wq: FakeQuantize) -> tuple[int, int]:
    """(axis, block size) of the weight's DequantizeLinear: 0/0 per tensor or channel, 1/g per group."""
    spec = wq.spec
    qscheme = spec.qscheme or QSchemeType.per_tensor
    if qscheme == QSchemeType.per_channel:
        if spec.ch_axis not in (0, -2):
            raise _unsupported(owner, f"per_channel weights on ch_axis={spec.ch_axis}")
    elif qscheme == QSchemeType.per_group:
        if spec.ch_axis not in (1, -1):
            raise _unsupported(owner, f"per_group weights on ch_axis={spec.ch_axis}")
        return 1, int(spec.group_size)
    return 0, 0


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
    out = F.linear(x, _weight(self, x.dtype), bias)
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
    try:
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                module.name = module.name or name
                if module.weight_quantizer is not None:
                    # computed outside the trace, so the graph holds them as constants (not the unpacking)
                    with torch.no_grad():
                        _WEIGHTS[id(module)] = _weight_constants(module.name, module)
                module.forward = types.MethodType(_onnx_forward, module)  # type: ignore[method-assign]
                patched.append(module)
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


def _pack_nibbles(values: Any) -> bytes:
    """ONNX INT4/UINT4 raw data: two elements per byte, the first in the low nibble."""
    import numpy as np

    flat = (values.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype=np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _typed_initializer(name: str, values: Any, onnx_type: int) -> Any:
    """An INT8/UINT8/INT4/UINT4 initializer holding the int8/uint8 codes ``values``."""
    from onnx import TensorProto, helper

    dims = list(values.shape)
    if onnx_type in (TensorProto.INT4, TensorProto.UINT4):
        return helper.make_tensor(name, onnx_type, dims, _pack_nibbles(values), raw=True)
    if onnx_type not in (TensorProto.INT8, TensorProto.UINT8):
        raise RuntimeError(f"ONNX export: no conversion of weight codes to ONNX type {onnx_type} (internal error)")
    return helper.make_tensor(name, onnx_type, dims, values.tobytes(), raw=True)


def _retype_weight_codes(graph: Any) -> set[str]:
    """Replace each ``quark::Codes(initializer)`` by an initializer of the recorded element type."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    drop_nodes, drop_inits, new_inits, retyped = [], set(), [], set()
    # the codes initializer is named after the weight (`model.layers.0.mlp.up_proj.weight`) when free
    taken = set(initializers) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    renames: dict[str, str] = {}
    for node in graph.node:
        if not (node.domain == "quark" and node.op_type == "Codes"):
            continue
        source = node.input[0]
        if source in initializers:
            tensor = initializers[source]
            if uses[source] == 1:
                drop_inits.add(source)
        elif source in constants:
            tensor = helper.get_attribute_value(constants[source].attribute[0])
            if uses[source] == 1:
                drop_nodes.append(constants[source])
        else:
            raise RuntimeError(f"ONNX export: weight codes {source!r} are not a constant (internal error)")
        attrs = {a.name: a for a in node.attribute}
        onnx_type = attrs["to"].i
        name = attrs["name"].s.decode() if "name" in attrs else node.output[0]
        if name in taken:
            name = node.output[0]
        taken.add(name)
        renames[node.output[0]] = name
        if tensor.data_type == onnx_type:  # fp8 codes arrive typed already
            typed = TensorProto()
            typed.CopyFrom(tensor)
            typed.name = name
        else:
            typed = _typed_initializer(name, numpy_helper.to_array(tensor), onnx_type)
        new_inits.append(typed)
        retyped.add(name)
        drop_nodes.append(node)
    for node in drop_nodes:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    kept = [t for t in graph.initializer if t.name not in drop_inits]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    return retyped


def _finish_graph(path: Path) -> None:
    """Give weight codes their element type, turn ``quark::ZeroPoint`` into ``Cast``, check the model."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    retyped = _retype_weight_codes(model.graph)
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


__all__ = ["DEFAULT_OPSET", "ONNX_TYPES", "SUPPORTED", "CausalLMLogits", "export_onnx", "onnx_mode", "spec_problem"]
