"""QuantLinear: fake-quant forward, freeze to real storage, frozen == fake-quant, layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quark.torch.quantization import formats
from quark.torch.quantization.config.config import QuantizationConfig, QuantizationSpec
from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear


def S(dtype, qscheme=QSchemeType.per_tensor, **kw):
    return QuantizationSpec(dtype=dtype, qscheme=qscheme, **kw)


def MX(element):
    return S(Dtype.mx, QSchemeType.per_group, mx_element_dtype=element, ch_axis=-1, group_size=32,
             is_dynamic=True)


WEIGHT_SPECS = {
    "int8_tensor": S(Dtype.int8, symmetric=True),
    "int8_channel": S(Dtype.int8, QSchemeType.per_channel, ch_axis=0, symmetric=True),
    "uint8_tensor_asym": S(Dtype.uint8, symmetric=False),
    "int4_group_sym": S(Dtype.int4, QSchemeType.per_group, ch_axis=1, group_size=32, symmetric=True),
    "uint4_group_asym": S(Dtype.uint4, QSchemeType.per_group, ch_axis=1, group_size=32, symmetric=False),
    "int4_channel": S(Dtype.int4, QSchemeType.per_channel, ch_axis=0, symmetric=True),
    "uint4_channel_asym": S(Dtype.uint4, QSchemeType.per_channel, ch_axis=0, symmetric=False),
    "int2_group": S(Dtype.int2, QSchemeType.per_group, ch_axis=1, group_size=32, symmetric=True),
    "fp8_tensor": S(Dtype.fp8_e4m3),
    "fp8_channel": S(Dtype.fp8_e4m3, QSchemeType.per_channel, ch_axis=0),
    "fp8_e5m2": S(Dtype.fp8_e5m2),
    "fp4_group": S(Dtype.fp4, QSchemeType.per_group, ch_axis=-1, group_size=16),
    "fp6_group": S(Dtype.fp6_e2m3, QSchemeType.per_group, ch_axis=-1, group_size=16),
    "mxfp4": MX(Dtype.fp4),
    "mxfp4_checkpoint_form": S(Dtype.fp4, QSchemeType.per_group, ch_axis=-1, group_size=32, scale_format="e8m0"),
    "mxfp6_e3m2": MX(Dtype.fp6_e3m2),
    "mxfp6_e2m3": MX(Dtype.fp6_e2m3),
    "mxfp8": MX(Dtype.fp8_e4m3),
    "mxint8": MX(Dtype.int8),
    "bfp16": S(Dtype.bfp16, QSchemeType.per_group, ch_axis=-1, group_size=8, is_dynamic=True),
    "mx6": S(Dtype.mx6, QSchemeType.per_group, ch_axis=-1, group_size=16, is_dynamic=True),
    "mx9": S(Dtype.mx9, QSchemeType.per_group, ch_axis=-1, group_size=16, is_dynamic=True),
    "float16": S(Dtype.float16),
    "bfloat16": S(Dtype.bfloat16),
}


def make(weight_spec, input_spec=None, out=64, inp=96, bias=True):
    torch.manual_seed(0)
    linear = nn.Linear(inp, out, bias=bias)
    config = QuantizationConfig(weight=weight_spec, input_tensors=input_spec)
    return linear, QuantLinear.from_float(linear, config, name="layer")


@pytest.mark.parametrize("name", list(WEIGHT_SPECS))
@pytest.mark.parametrize("pack_method", ["reorder", "order"])
def test_frozen_equals_fake_quant(name, pack_method):
    linear, q = make(WEIGHT_SPECS[name])
    x = torch.randn(3, 96)
    fake = q(x)
    assert not torch.equal(fake, linear(x)) or name in ("float16", "bfloat16")
    q.freeze(pack_method)
    assert q.frozen
    torch.testing.assert_close(q(x), fake, rtol=0, atol=1e-5)
    q.freeze(pack_method)  # twice is safe
    torch.testing.assert_close(q(x), fake, rtol=0, atol=1e-5)


def test_shares_parameters_and_keeps_float_weight_until_freeze():
    linear, q = make(WEIGHT_SPECS["int8_tensor"])
    assert q.weight is linear.weight and q.bias is linear.bias
    before = linear.weight.detach().clone()
    q(torch.randn(2, 96))
    assert torch.equal(linear.weight, before)


STORAGE = {
    "fp8_tensor": (torch.float8_e4m3fn, (64, 96), (), None),
    "int8_tensor": (torch.int8, (64, 96), (), ()),
    "int8_channel": (torch.int8, (64, 96), (64,), (64,)),
    "int4_group_sym": (torch.int32, (96, 8), (3, 64), (3, 8)),
    "uint4_group_asym": (torch.int32, (96, 8), (3, 64), (3, 8)),
    "int4_channel": (torch.int32, (64, 12), (64,), (8,)),
    "mxfp4": (torch.uint8, (64, 48), (64, 3), None),
    "mxfp4_checkpoint_form": (torch.uint8, (64, 48), (64, 3), None),
    "mxfp6_e2m3": (torch.uint8, (64, 72), (64, 3), None),
    "mxfp8": (torch.float8_e4m3fn, (64, 96), (64, 3), None),
}


@pytest.mark.parametrize("name", list(STORAGE))
def test_storage_layout_matches_checkpoint_format(name):
    _, q = make(WEIGHT_SPECS[name])
    q.freeze()
    dtype, wshape, sshape, zshape = STORAGE[name]
    assert q.weight.dtype == dtype and tuple(q.weight.shape) == wshape
    assert tuple(q.weight_quantizer.scale.shape) == sshape
    if zshape is None:
        assert q.weight_quantizer.zero_point is None or q.weight_quantizer.zero_point.abs().sum() == 0
    else:
        assert tuple(q.weight_quantizer.zero_point.shape) == zshape
    if name.startswith("mx"):
        assert q.weight_quantizer.scale.dtype == torch.uint8


def test_int4_group_decode_formula_by_hand():
    """w[o,i] = (q[i,o] - zp[i//g,o]) * s[i//g,o] with the reorder nibble order."""
    _, q = make(WEIGHT_SPECS["uint4_group_asym"], bias=False)
    fake_w = q.quantized_weight(torch.float32).detach()
    q.freeze("reorder")
    packed, s = q.weight, q.weight_quantizer.scale
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    codes = torch.empty(96, 64, dtype=torch.int64)
    zps = torch.empty(3, 64, dtype=torch.int64)
    for nib, logical in enumerate(order):
        codes[:, logical::8] = (packed.to(torch.int64) >> (4 * nib)) & 0xF
        zps[:, logical::8] = (q.weight_quantizer.zero_point.to(torch.int64) >> (4 * nib)) & 0xF
    g = torch.arange(96) // 32
    w = (codes - zps[g]).float() * s[g]
    torch.testing.assert_close(w.t(), fake_w)


def test_static_input_and_output_quantizers():
    linear = nn.Linear(32, 32)
    spec = S(Dtype.fp8_e4m3, is_dynamic=False)
    q = QuantLinear.from_float(linear, QuantizationConfig(weight=spec, input_tensors=spec, output_tensors=spec))
    x = torch.randn(4, 32)
    q(x)  # observing
    for quantizer in q.quantizers():
        quantizer.finalize()
    y = q(x)
    assert torch.isfinite(y).all()
    assert q.input_quantizer.scale.item() == pytest.approx(x.abs().max().item() / 448)
    out_vals = y / q.output_quantizer.scale
    torch.testing.assert_close(out_vals.to(torch.float8_e4m3fn).float(), out_vals)


def test_input_rotation_is_applied():
    linear = nn.Linear(4, 3, bias=False)
    q = QuantLinear.from_float(linear, QuantizationConfig(weight=S(Dtype.bfloat16)))
    h = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.int8)
    q.input_rotation = h
    x = torch.randn(2, 4)
    expected = (x @ h.float() / 2) @ linear.weight.to(torch.bfloat16).float().t()
    torch.testing.assert_close(q(x), expected)


def test_formats_used_for_fake_weight():
    linear, q = make(WEIGHT_SPECS["int4_group_sym"])
    wq = q.weight_quantizer
    expected = formats.fake_quantize(linear.weight, wq.scale, wq.zero_point, Dtype.int4,
                                     qscheme=QSchemeType.per_group, ch_axis=1, group_size=32)
    torch.testing.assert_close(q.quantized_weight(torch.float32), expected)


def test_from_float_keeps_input_rotation_and_recalibrates():
    linear = nn.Linear(4, 3, bias=False)
    h = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.int8)
    linear.register_buffer("input_rotation", h)
    q = QuantLinear.from_float(linear, QuantizationConfig(weight=WEIGHT_SPECS["int8_tensor"]))
    assert torch.equal(q.input_rotation, h)
    old = q.weight_quantizer.scale.clone()
    with torch.no_grad():
        q.weight.mul_(2)
    q.recalibrate_weight()
    torch.testing.assert_close(q.weight_quantizer.scale, old * 2)
