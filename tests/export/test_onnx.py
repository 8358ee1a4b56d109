"""ONNX export: Q/DQ graphs run in onnxruntime (CPU) and match the PyTorch fake-quant model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from quark.torch import ModelExporter, ModelQuantizer
from quark.torch.export.config.config import ExporterConfig
from quark.torch.quantization.config.config import Config, QuantizationConfig, QuantizationSpec
from quark.torch.quantization.config.type import Dtype, QSchemeType
from tests.export.helpers import INPUT, frozen_model, logits

# ORT re-associates float32 sums, so values differ by ~1e-7 before each activation quantizer; an
# element sitting on a rounding boundary can then land one quantization step away, and later
# positions see it through attention. Stated tolerance: mean |diff| <= 1e-3 and max |diff| <= 0.02
# (without such a flip the difference is ~2e-7, e.g. on the fixed 8-token input).
MEAN_TOL, MAX_TOL = 1e-3, 0.02


def _close(got, expected):
    diff = np.abs(got - expected)
    return float(diff.mean()) <= MEAN_TOL and float(diff.max()) <= MAX_TOL


def _run(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _ops(path):
    model = onnx.load(str(path))
    return [n.op_type for n in model.graph.node], model


@pytest.mark.parametrize("scheme", ["int8", "fp8", "uint4_wo_32", "int4_wo_64"])
def test_llm_schemes_match_pytorch(tmp_path, scheme):
    model, _ = frozen_model(scheme)
    path = ModelExporter(ExporterConfig(), tmp_path / "o").export_onnx_model(model, INPUT)
    ops, proto = _ops(path)
    assert ops.count("DequantizeLinear") >= 14  # every quantized Linear has at least its weight Q/DQ
    assert proto.opset_import[0].version == 21
    out = _run(path, {"input_ids": INPUT.numpy()})
    assert _close(out, logits(model).numpy())
    longer = torch.randint(0, 128, (2, 11))  # dynamic batch and sequence axes
    assert _close(_run(path, {"input_ids": longer.numpy()}), model(longer).logits.detach().numpy())


def _spec(dtype, qscheme, **kw):
    return QuantizationSpec(dtype=dtype, qscheme=qscheme, **kw)


MLP_CASES = {
    "int8_per_channel_dynamic_act": QuantizationConfig(
        weight=_spec(Dtype.int8, QSchemeType.per_channel, ch_axis=0),
        input_tensors=_spec(Dtype.int8, QSchemeType.per_tensor, is_dynamic=True)),
    "uint8_asym_static": QuantizationConfig(
        weight=_spec(Dtype.uint8, QSchemeType.per_tensor, symmetric=False),
        input_tensors=_spec(Dtype.uint8, QSchemeType.per_tensor, symmetric=False),
        output_tensors=_spec(Dtype.uint8, QSchemeType.per_tensor, symmetric=False)),
    "uint4_per_channel_fp8_dynamic": QuantizationConfig(
        weight=_spec(Dtype.uint4, QSchemeType.per_channel, ch_axis=0, symmetric=False),
        input_tensors=_spec(Dtype.fp8_e4m3, QSchemeType.per_tensor, is_dynamic=True)),
    "fp8_e5m2_weight_fp16_cast": QuantizationConfig(
        weight=_spec(Dtype.fp8_e5m2, QSchemeType.per_tensor), input_tensors=QuantizationSpec(dtype=Dtype.float16)),
}


def _mlp(qconfig: QuantizationConfig, freeze: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    data = [torch.randn(4, 64) for _ in range(2)]
    ModelQuantizer(Config(global_quant_config=qconfig)).quantize_model(model, data)
    if freeze:
        ModelQuantizer.freeze(model)
    return model


@pytest.mark.parametrize("case", sorted(MLP_CASES))
@pytest.mark.parametrize("freeze", [True, False])
def test_granularities_and_dtypes(tmp_path, case, freeze):
    model = _mlp(MLP_CASES[case], freeze)
    x = torch.randn(5, 64)
    path = ModelExporter(ExporterConfig(), tmp_path / "o").export_onnx_model(model, x)
    ops, _ = _ops(path)
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    if "cast" in case:
        assert "Cast" in ops
    with torch.no_grad():
        expected = model(x).numpy()
    assert _close(_run(path, {"input_0": x.numpy()}), expected)


@pytest.mark.parametrize("scheme", ["mxfp4", "mx6"])
def test_formats_without_onnx_ops_are_refused(tmp_path, scheme):
    model, _ = frozen_model(scheme)
    with pytest.raises(ValueError, match=r"ONNX export cannot represent .*Supported: int8, uint8, int4"):
        ModelExporter(ExporterConfig(), tmp_path / "o").export_onnx_model(model, INPUT)
    assert not (tmp_path / "o").exists()


def test_unquantized_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no quantized layer"):
        ModelExporter(ExporterConfig(), tmp_path / "o").export_onnx_model(nn.Linear(4, 4), torch.randn(1, 4))
