"""The arithmetic that makes our template schemes reproduce amd-quark 0.13 bit for bit, pinned on
hand-computed cases (the cross-check against the reference itself is
``tests/export/test_reference_crosscheck.py``, which needs the reference installed).

- integers divide by their scale as ``x * (1 / scale)`` (the float32 reciprocal), not ``x / scale``;
  the two differ where ``x / scale`` lands on a tie. ``set_integer_division("exact")`` keeps IEEE
  division as an option;
- BFP16 keeps a ``-128`` mantissa and moves a block up an exponent only for ``+128``;
- the ``mx6`` template scheme has blocks of 16;
- static activation ranges are observed on the float model (weights not yet quantized).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quark.torch import LLMTemplate, ModelQuantizer
from quark.torch.quantization import formats
from quark.torch.quantization.config.config import Config, QuantizationConfig, QuantizationSpec
from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.formats.affine import fake_quantize_broadcast

PT = QSchemeType.per_tensor
# Found by search, exact float32 values: x / s is exactly the tie, x * (1 / s) is one ulp off it.
S_INT4 = 0.05062565952539444
X_INT4 = -0.3796924352645874  # x / s = -7.5 -> -8 (half even); x * (1 / s) = -7.4999995 -> -7
S_INT8 = 0.05945923179388046
X_INT8 = 0.14864808320999146  # x / s = 2.5 -> 2 (half even); x * (1 / s) = 2.5000002 -> 3


def _t(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32)


def test_the_cases_are_ties_of_the_division_only():
    assert (_t(X_INT4) / _t(S_INT4)).item() == -7.5
    assert (_t(X_INT4) * (1 / _t(S_INT4))).item() == pytest.approx(-7.5, abs=1e-6)
    assert (_t(X_INT4) * (1 / _t(S_INT4))).item() != -7.5
    assert (_t(X_INT8) / _t(S_INT8)).item() == 2.5
    assert (_t(X_INT8) * (1 / _t(S_INT8))).item() > 2.5


@pytest.mark.parametrize(("x", "s", "dtype", "reciprocal_code", "exact_code"), [
    (X_INT4, S_INT4, Dtype.int4, -7, -8),
    (-X_INT4, S_INT4, Dtype.int4, 7, 7),  # +7.5 rounds to 8 and clamps to 7 either way
    (X_INT8, S_INT8, Dtype.int8, 3, 2),
    (-X_INT8, S_INT8, Dtype.int8, -3, -2),
])
def test_integer_codes_use_the_reciprocal_by_default(x, s, dtype, reciprocal_code, exact_code):
    xt, st = _t(x), _t(s)
    assert formats.get_integer_division() == "reciprocal"
    codes = formats.quantize(xt, st, None, dtype, qscheme=PT)
    assert codes.tolist() == [reciprocal_code]
    fake = formats.fake_quantize(xt, st, None, dtype, qscheme=PT)
    assert fake.tolist() == (torch.tensor([float(reciprocal_code)]) * st).tolist()
    assert fake_quantize_broadcast(xt, st, None, dtype).tolist() == fake.tolist()
    with formats.integer_division("exact"):
        assert formats.quantize(xt, st, None, dtype, qscheme=PT).tolist() == [exact_code]
        exact_fake = formats.fake_quantize(xt, st, None, dtype, qscheme=PT)
        assert exact_fake.tolist() == (torch.tensor([float(exact_code)]) * st).tolist()
    assert formats.get_integer_division() == "reciprocal"


def test_unsigned_codes_with_a_zero_point_use_the_reciprocal_too():
    # uint4, zero point 8: -7.5 + 8 -> 0 (exact: -8 + 8 = 0), -7.4999995 + 8 -> 1 (reciprocal: -7 + 8)
    codes = formats.quantize(_t(X_INT4), _t(S_INT4), torch.tensor([8]), Dtype.uint4, qscheme=PT)
    assert codes.tolist() == [1]
    with formats.integer_division("exact"):
        assert formats.quantize(_t(X_INT4), _t(S_INT4), torch.tensor([8]), Dtype.uint4, qscheme=PT).tolist() == [0]


def test_set_integer_division_returns_the_previous_mode_and_refuses_unknown_modes():
    previous = formats.set_integer_division("exact")
    try:
        assert previous == "reciprocal"
        assert formats.get_integer_division() == "exact"
    finally:
        formats.set_integer_division(previous)
    with pytest.raises(ValueError, match=r"mode='ieee'.*reciprocal, exact"):
        formats.set_integer_division("ieee")
    with pytest.raises(ValueError, match="reciprocal, exact"), formats.integer_division("nearest"):
        pass
    assert formats.get_integer_division() == "reciprocal"


def test_context_manager_restores_the_mode_after_an_error():
    with pytest.raises(RuntimeError), formats.integer_division("exact"):
        raise RuntimeError("boom")
    assert formats.get_integer_division() == "reciprocal"


# ----------------------------------------------------------------------------------- BFP16
def test_bfp16_keeps_a_minus_128_mantissa():
    # amax 1.995 -> E = 0, step 2^-6: -1.995 * 64 = -127.68 -> -128 fits the int8 mantissa, so the
    # block keeps E = 0 and 33/64 stays exact (a bumped block would round it to 0.5)
    x = torch.tensor([[-1.995, 33 / 64, 0, 0, 0, 0, 0, 0]])
    stored = formats.bfp_quantize(x, Dtype.bfp16)
    assert stored.shared_exp.tolist() == [[127]]
    assert stored.mantissa[0, :2].tolist() == [-128, 33]
    expected = torch.tensor([[-2.0, 33 / 64, 0, 0, 0, 0, 0, 0]])
    assert torch.equal(formats.bfp_dequantize(stored, Dtype.bfp16), expected)
    assert torch.equal(formats.bfp_fake_quantize(x, Dtype.bfp16), expected)


def test_bfp16_moves_up_an_exponent_for_plus_128():
    # 1.995 * 64 = 127.68 -> 128 does not fit: E = 1, step 2^-5, and 33/64 * 32 = 16.5 -> 16
    x = torch.tensor([[1.995, 33 / 64, 0, 0, 0, 0, 0, 0]])
    stored = formats.bfp_quantize(x, Dtype.bfp16)
    assert stored.shared_exp.tolist() == [[128]]
    assert stored.mantissa[0, :2].tolist() == [64, 16]
    expected = torch.tensor([[2.0, 0.5, 0, 0, 0, 0, 0, 0]])
    assert torch.equal(formats.bfp_fake_quantize(x, Dtype.bfp16), expected)


def test_mx6_keeps_sign_magnitude_mantissas():
    # MX6 saturates at +-15 (sign + 4 bits) on both sides: -1.99 * 8 = -15.92 -> -15
    x = torch.tensor([[-1.99] + [0.0] * 15])
    stored = formats.bfp_quantize(x, Dtype.mx6)
    assert stored.mantissa[0, 0].item() == -15


# ----------------------------------------------------------------------------------- templates
def test_mx6_template_scheme_has_blocks_of_16():
    config = LLMTemplate.get("llama").get_config(scheme="mx6")
    assert config.global_quant_config.weight.group_size == 16
    assert config.global_quant_config.input_tensors.group_size == 16


# ----------------------------------------------------------------------------------- calibration
def _int8_static() -> Config:
    spec = QuantizationSpec(dtype=Dtype.int8, qscheme=PT, symmetric=True, is_dynamic=False)
    return Config(global_quant_config=QuantizationConfig(input_tensors=spec, weight=spec))


def _two_linears() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 4, bias=False))


def test_static_activation_ranges_are_observed_on_the_float_model():
    batches = [torch.randn(8, 16) for _ in range(2)]
    float_model = _two_linears()
    with torch.no_grad():
        amax = max(float_model[0](b).abs().max().item() for b in batches)
    model = ModelQuantizer(_int8_static()).quantize_model(_two_linears(), batches)
    assert model[1].input_quantizer.scale.item() == pytest.approx(amax / 127.5, rel=1e-6)


def test_calibrate_on_quantized_observes_the_quantized_activations():
    batches = [torch.randn(8, 16) for _ in range(2)]
    reference = ModelQuantizer(_int8_static()).quantize_model(_two_linears(), batches)
    model = ModelQuantizer(_int8_static(), calibrate_on_quantized=True).quantize_model(_two_linears(), batches)
    # while calibrating, the first input quantizer observes (passes through); its weight is quantized
    with torch.no_grad():
        w0 = model[0].weight_quantizer(model[0].weight)
        amax = max((b @ w0.T).abs().max().item() for b in batches)
    assert model[1].input_quantizer.scale.item() == pytest.approx(amax / 127.5, rel=1e-6)
    assert model[1].input_quantizer.scale.item() != reference[1].input_quantizer.scale.item()
