"""Issue 15 (config and format items): non-finite values, configs refused when built, number bounds.

- a NaN/Inf weight, calibration tensor, scale or zero point is refused naming the quantizer, for
  every format (MX, MX6/MX9 and BFP16 included) and at every entry point (calibration, algorithm
  qparams, dynamic qparams, freeze, the format functions);
- combinations whose frozen forward would differ from the fake-quantized one, or that would
  crash later, are refused when the config is built, naming the field;
- absurd numbers in specs and algorithm configs give a ValueError naming the field and its range.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quark.torch.export.config.config import JsonExporterConfig
from quark.torch.llm import schemes
from quark.torch.quantization import formats
from quark.torch.quantization.config.config import (
    AutoSmoothQuantConfig,
    BFP16Spec,
    Config,
    FP8E4M3PerTensorSpec,
    GPTQConfig,
    Int4PerGroupSpec,
    Int8PerGroupSpec,
    Int8PerTensorSpec,
    MX6Spec,
    MX9Spec,
    MXSpec,
    OCP_MXFP4Spec,
    QuantizationConfig,
    QuantizationSpec,
    SmoothQuantConfig,
    Uint4PerGroupSpec,
)
from quark.torch.quantization.config.template import LLMTemplate
from quark.torch.quantization.config.type import Dtype, QSchemeType, ZeroPointType
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
from quark.torch.quantization.tensor_quantize import FakeQuantize, NonFiniteTensorError


def _spec(dtype: Dtype, qscheme: QSchemeType = QSchemeType.per_tensor, **kw: object) -> QuantizationSpec:
    return QuantizationSpec(dtype=dtype, qscheme=qscheme, **kw)  # type: ignore[arg-type]


# One weight spec per format family: the rule must hold for each.
WEIGHT_SPECS: dict[str, QuantizationSpec] = {
    "int8": Int8PerTensorSpec().to_quantization_spec(),
    "uint4_group": Uint4PerGroupSpec(group_size=32).to_quantization_spec(),
    "int2_group": _spec(Dtype.int2, QSchemeType.per_group, ch_axis=-1, group_size=32),
    "fp8_e4m3": FP8E4M3PerTensorSpec().to_quantization_spec(),
    "fp8_e5m2": _spec(Dtype.fp8_e5m2),
    "fp4_group": _spec(Dtype.fp4, QSchemeType.per_group, ch_axis=-1, group_size=16),
    "fp6_group": _spec(Dtype.fp6_e3m2, QSchemeType.per_group, ch_axis=-1, group_size=16),
    "mxfp4": MXSpec(mx_element_dtype=Dtype.fp4).to_quantization_spec(),
    "mxfp8": MXSpec(mx_element_dtype=Dtype.fp8_e4m3).to_quantization_spec(),
    "mxint8": MXSpec(mx_element_dtype=Dtype.int8).to_quantization_spec(),
    "ocp_mxfp4_checkpoint_form": OCP_MXFP4Spec(is_dynamic=False).to_quantization_spec(),
    "mx6": MX6Spec().to_quantization_spec(),
    "mx9": MX9Spec().to_quantization_spec(),
    "bfp16": BFP16Spec().to_quantization_spec(),
    "float16": _spec(Dtype.float16),
}
BLOCK_WEIGHT_SPECS = ("mxfp4", "mxfp8", "mxint8", "ocp_mxfp4_checkpoint_form", "mx6", "mx9", "bfp16")


def _linear(seed: int = 0, out_features: int = 16, in_features: int = 64) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


# ------------------------------------------------------------------------------------------------
# item 3: one rule for NaN/Inf
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", list(WEIGHT_SPECS))
def test_non_finite_weight_is_refused_for_every_format(name: str, bad: float) -> None:
    linear = _linear()
    with torch.no_grad():
        linear.weight[3, 5] = bad
    config = QuantizationConfig(weight=WEIGHT_SPECS[name])
    with pytest.raises(NonFiniteTensorError, match=r"layer\.weight_quantizer: tensor of shape \(16, 64\)"):
        QuantLinear.from_float(linear, config, name="layer")


@pytest.mark.parametrize("name", BLOCK_WEIGHT_SPECS)
def test_weight_turned_non_finite_after_calibration_is_refused_at_freeze_and_nothing_changes(name: str) -> None:
    linear = _linear()
    q = QuantLinear.from_float(linear, QuantizationConfig(weight=WEIGHT_SPECS[name]), name="layer")
    with torch.no_grad():
        q.weight[0, 0] = float("nan")  # e.g. an algorithm diverged after calibration
    before = q.weight.detach().clone()
    with pytest.raises(NonFiniteTensorError, match=r"layer\.weight_quantizer: weight of shape .* fix the model"):
        q.freeze()
    assert not q.frozen and q.weight.dtype == torch.float32
    assert torch.equal(q.weight.isnan(), before.isnan())


@pytest.mark.parametrize("name", ["mxfp4", "mx6", "bfp16"])
def test_block_format_activation_holding_nan_is_refused(name: str) -> None:
    spec = WEIGHT_SPECS[name].replace(is_dynamic=True)
    fq = FakeQuantize(spec, name="layer.input_quantizer")
    x = torch.randn(2, 64)
    x[1, 7] = float("inf")
    with pytest.raises(NonFiniteTensorError, match=r"layer\.input_quantizer: tensor of shape \(2, 64\)"):
        fq(x)


@pytest.mark.parametrize("spec", [Int8PerTensorSpec(is_dynamic=True).to_quantization_spec(),
                                  FP8E4M3PerTensorSpec(is_dynamic=True).to_quantization_spec()],
                         ids=["int8", "fp8"])
def test_dynamic_scale_from_non_finite_input_is_refused_naming_the_quantizer(spec: QuantizationSpec) -> None:
    fq = FakeQuantize(spec, name="layer.input_quantizer")
    x = torch.randn(2, 64)
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteTensorError, match=r"layer\.input_quantizer\.scale: scale"):
        fq(x)


def test_scale_overflowing_float32_is_refused_at_calibration() -> None:
    # finite weights whose range (max - min) overflows float32 give an infinite asymmetric scale
    spec = _spec(Dtype.uint8, symmetric=False)
    linear = _linear()
    with torch.no_grad():
        linear.weight[0, 0] = 3e38
        linear.weight[0, 1] = -3e38
    with pytest.raises(NonFiniteTensorError, match=r"layer\.weight_quantizer\.scale: scale of shape \(\)"):
        QuantLinear.from_float(linear, QuantizationConfig(weight=spec), name="layer")


@pytest.mark.parametrize(("scale", "zero_point", "field"), [
    (torch.tensor(float("nan")), None, "scale"),
    (torch.tensor(float("inf")), None, "scale"),
    (torch.tensor(0.1), torch.tensor(float("nan")), "zero_point"),
])
def test_set_qparams_refuses_non_finite(scale: torch.Tensor, zero_point: torch.Tensor | None, field: str) -> None:
    spec = _spec(Dtype.uint8, symmetric=False, zero_point_type=ZeroPointType.float32)
    fq = FakeQuantize(spec, name="layer.weight_quantizer")
    with pytest.raises(NonFiniteTensorError, match=rf"layer\.weight_quantizer\.{field}"):
        fq.set_qparams(scale, zero_point)
    assert fq.scale is None and not fq.qparams_fixed


@pytest.mark.parametrize("fn", [formats.quantize, formats.fake_quantize])
@pytest.mark.parametrize(("scale", "zero_point", "field"), [
    (torch.tensor([0.1, float("nan")]), None, "scale"),
    (torch.tensor([0.1, float("inf")]), None, "scale"),
    (torch.tensor([0.1, 0.1]), torch.tensor([0.0, float("nan")]), "zero_point"),
])
def test_format_functions_refuse_non_finite_qparams(fn, scale, zero_point, field) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=rf"{field} of shape \(2,\) holds 1 NaN/Inf"):
        fn(x, scale, zero_point, Dtype.uint8, qscheme="per_channel", ch_axis=0)
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=rf"formats.dequantize: {field}"):
        formats.dequantize(codes, scale, zero_point, Dtype.uint8, qscheme="per_channel", ch_axis=0)


@pytest.mark.parametrize("mode", ["ceil", "even"])
@pytest.mark.parametrize("element", [Dtype.fp4, Dtype.fp6_e3m2, Dtype.fp8_e4m3])
def test_mx_block_max_near_float32_max_saturates_instead_of_decoding_to_inf(element: Dtype, mode: str) -> None:
    # formerly: ceil/even rounded the shared exponent up to 2^128 - emax and the block decoded as Inf
    x = torch.tensor([[3.2965e38, -1.0, 2.0**-100, 0.0]])
    fake = formats.mx_fake_quantize(x, element, block_size=4, scale_mode=mode)
    assert bool(torch.isfinite(fake).all())
    assert torch.equal(fake, formats.mx_fake_quantize(x, element, block_size=4, scale_mode="floor"))
    codes, scales = formats.mx_quantize(x, element, block_size=4, scale_mode=mode)
    assert torch.equal(formats.mx_dequantize(codes, scales, element, block_size=4), fake)


def test_scale_whose_grid_passes_float32_max_is_refused() -> None:
    # formerly: -3.4e38 rounded to code -128 and dequantized to -inf (128 * amax / 127.5 > float32 max)
    x = torch.tensor([-3.4e38, 1.0])
    scale = x.abs().max() / 127.5
    for fn in (formats.fake_quantize, formats.quantize):
        with pytest.raises(ValueError, match=r"scale of shape \(\) reaches .* beyond float32's range"):
            fn(x, scale, None, Dtype.int8, qscheme="per_tensor")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 10**400, -1.0, True, "0.1"])
def test_min_kv_scale_must_be_finite_everywhere(bad: object) -> None:
    with pytest.raises(ValueError, match=r"Config\.min_kv_scale=.* must be (a number )?in \[0, "):
        Config(global_quant_config=QuantizationConfig(), min_kv_scale=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"JsonExporterConfig\.min_kv_scale=.* must be (a number )?in \[0, "):
        JsonExporterConfig(min_kv_scale=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"min_kv_scale=.* must be (a number )?in \[0, "):
        LLMTemplate.get("llama").get_config(scheme="int8", kv_cache_scheme="fp8", min_kv_scale=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Config\.min_kv_scale"):
        Config.from_dict({"global_quant_config": QuantizationConfig().to_dict(),
                          "export": {"min_kv_scale": bad}})
    assert Config(global_quant_config=QuantizationConfig(), min_kv_scale=2).min_kv_scale == 2.0


# ------------------------------------------------------------------------------------------------
# item 4: accepted, then crash -> refused when the config is built (or working)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_two_stage_weight_with_gptq_or_awq_builds(algorithm: str) -> None:
    # formerly: Config accepted, then AttributeError ('list' object has no attribute 'dtype') in build_step;
    # GPTQ and AWQ now quantize two-stage weights (tests/algorithm/test_weight_formats.py)
    request = schemes.SchemeRequest("w_fp4_scale_fp8", algorithms=[algorithm])
    config = schemes.build_config(schemes.template_for("llama"), request)
    assert isinstance(config.global_quant_config.weight, list)


@pytest.mark.parametrize("spec", [
    Int4PerGroupSpec(is_dynamic=True).to_quantization_spec(),
    Uint4PerGroupSpec(is_dynamic=True).to_quantization_spec(),
    Int8PerTensorSpec(is_dynamic=True).to_quantization_spec(),
    FP8E4M3PerTensorSpec(is_dynamic=True).to_quantization_spec(),
], ids=["int4", "uint4", "int8", "fp8"])
def test_dynamic_weight_spec_is_refused_when_the_config_is_built(spec: QuantizationSpec) -> None:
    # formerly: AttributeError at freeze (int4/uint4) or in the frozen forward (int8/fp8)
    with pytest.raises(ValueError, match=r"QuantizationConfig\.weight\.is_dynamic=True is not supported .*"
                                         r"allowed: False"):
        QuantizationConfig(weight=spec)
    with pytest.raises(ValueError, match=r"QuantizationConfig\.weight\.is_dynamic=True"):
        QuantizationConfig.from_dict({"weight": spec.to_dict()})


def test_dynamic_block_weights_and_dynamic_activations_stay_allowed() -> None:
    QuantizationConfig(weight=OCP_MXFP4Spec(is_dynamic=True).to_quantization_spec(),
                       input_tensors=Int8PerTensorSpec(is_dynamic=True).to_quantization_spec())


def test_static_per_group_activation_is_refused_and_dynamic_per_group_works_at_any_length() -> None:
    # formerly: the calibrated scale had the calibration batch's shape; other lengths failed
    static = Int8PerGroupSpec(group_size=32).to_quantization_spec()
    with pytest.raises(ValueError, match=r"QuantizationConfig\.input_tensors\.qscheme=per_group with "
                                         r"is_dynamic=False is not supported"):
        QuantizationConfig(input_tensors=static)
    with pytest.raises(ValueError, match=r"QuantizationConfig\.output_tensors\.qscheme=per_group"):
        QuantizationConfig(output_tensors=static)
    with pytest.raises(ValueError, match=r"QuantizationConfig\.input_tensors\.ch_axis=1 with qscheme=per_channel"):
        QuantizationConfig(input_tensors=_spec(Dtype.int8, QSchemeType.per_channel, ch_axis=1))
    dynamic = static.replace(is_dynamic=True)
    q = QuantLinear.from_float(_linear(), QuantizationConfig(weight=Int8PerTensorSpec().to_quantization_spec(),
                                                             input_tensors=dynamic), name="layer")
    for seq in (5, 7):
        assert q(torch.randn(2, seq, 64)).shape == (2, seq, 16)
    q.freeze()
    assert q(torch.randn(3, 9, 64)).shape == (3, 9, 16)


# ------------------------------------------------------------------------------------------------
# item 5: frozen == fake-quantized, or refused
# ------------------------------------------------------------------------------------------------
def test_float_zero_point_on_asymmetric_int_weight_is_refused() -> None:
    # formerly: the frozen forward rounded the zero point and differed by up to 0.037
    spec = _spec(Dtype.uint4, QSchemeType.per_group, ch_axis=-1, group_size=32, symmetric=False,
                 zero_point_type=ZeroPointType.float32)
    with pytest.raises(ValueError, match=r"QuantizationConfig\.weight\.zero_point_type=float32 is not supported "
                                         r"for an asymmetric uint4 weight.*allowed: int32"):
        QuantizationConfig(weight=spec)
    # activations are never frozen: a float zero point stays allowed there
    QuantizationConfig(input_tensors=spec.replace(is_dynamic=True))


def test_float_zero_point_on_symmetric_int_weight_freezes_exactly() -> None:
    spec = _spec(Dtype.uint4, QSchemeType.per_group, ch_axis=-1, group_size=32, symmetric=True,
                 zero_point_type=ZeroPointType.float32)
    q = QuantLinear.from_float(_linear(in_features=128), QuantizationConfig(weight=spec), name="layer")
    x = torch.randn(3, 128)
    fake = q(x)
    q.freeze()
    torch.testing.assert_close(q(x), fake, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BLOCK_WEIGHT_SPECS)
def test_block_weight_grouped_on_a_non_last_axis_is_refused(name: str) -> None:
    # formerly: fake-quant grouped along ch_axis, the frozen weight along the last axis (0.008-0.043 apart)
    spec = WEIGHT_SPECS[name].replace(ch_axis=0)
    with pytest.raises(ValueError, match=r"QuantizationConfig\.weight\.ch_axis=0 is not supported .*allowed: -1, 1"):
        QuantizationConfig(weight=spec)


@pytest.mark.parametrize("name", BLOCK_WEIGHT_SPECS)
def test_block_weight_on_axis_one_is_the_last_axis_and_freezes_exactly(name: str) -> None:
    spec = WEIGHT_SPECS[name].replace(ch_axis=1)
    q = QuantLinear.from_float(_linear(out_features=32, in_features=64), QuantizationConfig(weight=spec),
                               name="layer")
    x = torch.randn(3, 64)
    fake = q(x)
    q.freeze()
    torch.testing.assert_close(q(x), fake, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# items 6 and 7: numbers in range
# ------------------------------------------------------------------------------------------------
HUGE = 10**400


@pytest.mark.parametrize(("factory", "pattern"), [
    (lambda: _spec(Dtype.int4, QSchemeType.per_group, ch_axis=-1, group_size=2**62),
     r"QuantizationSpec\.group_size=4611686018427387904 is out of range; allowed: an int in \[1, 16777216\]"),
    (lambda: _spec(Dtype.int4, QSchemeType.per_group, ch_axis=-1, group_size=HUGE),
     r"QuantizationSpec\.group_size=1000.*\(401 chars\) is out of range"),
    (lambda: _spec(Dtype.int4, QSchemeType.per_group, ch_axis=-1, block_size=HUGE),
     r"QuantizationSpec\.block_size=.* is out of range; allowed: an int in \[1, "),
    (lambda: _spec(Dtype.int8, QSchemeType.per_channel, ch_axis=HUGE),
     r"QuantizationSpec\.ch_axis=.* is out of range; allowed: an int in \[-64, 63\]"),
    (lambda: _spec(Dtype.int8, QSchemeType.per_channel, ch_axis=-HUGE),
     r"QuantizationSpec\.ch_axis=.* is out of range"),
    (lambda: _spec(Dtype.int8, max_input_numel=HUGE),
     r"QuantizationSpec\.max_input_numel=.* is out of range; allowed: an int in \[1, 9223372036854775807\]"),
    (lambda: QuantizationSpec.from_dict({"dtype": "int8", "qscheme": "per_tensor", "max_input_numel": 2**64}),
     r"QuantizationSpec\.max_input_numel"),
    (lambda: Int4PerGroupSpec(group_size=2**62).to_quantization_spec(),
     r"Int4PerGroupSpec\.group_size=.* out of range"),
    (lambda: MXSpec(block_size=HUGE), r"MXSpec\.block_size=.* out of range"),
    (lambda: BFP16Spec(ch_axis=HUGE), r"BFP16Spec\.ch_axis=.* out of range"),
    (lambda: GPTQConfig(clip_search_steps=10**9),
     r"GPTQConfig\.clip_search_steps=1000000000 must be an integer in \[0, 1000\]"),
    (lambda: GPTQConfig(clip_search_steps=HUGE), r"GPTQConfig\.clip_search_steps=.*\(401 chars\)"),
    (lambda: GPTQConfig(damp_percent=HUGE), r"GPTQConfig\.damp_percent=.* must be > 0 and <= 1"),
    (lambda: GPTQConfig(damp_percent=float("nan")), r"GPTQConfig\.damp_percent=nan must be > 0 and <= 1"),
    (lambda: GPTQConfig(damp_percent=float("inf")), r"GPTQConfig\.damp_percent=inf must be > 0"),
    (lambda: SmoothQuantConfig(alpha=float("nan")), r"SmoothQuantConfig\.alpha=nan must be in \[0, 1\]"),
    (lambda: SmoothQuantConfig(alpha=HUGE), r"SmoothQuantConfig\.alpha=.* must be in \[0, 1\]"),
    (lambda: SmoothQuantConfig(scale_clamp_min=float("inf")), r"scale_clamp_min=inf must be > 0 and <= 1"),
    (lambda: SmoothQuantConfig(scale_clamp_min=float("nan")), r"scale_clamp_min=nan must be > 0 and <= 1"),
    (lambda: SmoothQuantConfig(scale_clamp_min=HUGE), r"scale_clamp_min=.* must be > 0 and <= 1"),
])
def test_absurd_numbers_give_a_value_error_naming_the_field_and_range(factory, pattern: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=pattern):
        factory()


def test_numbers_at_the_bounds_are_accepted() -> None:
    assert _spec(Dtype.int4, QSchemeType.per_group, ch_axis=-64, group_size=2**24).group_size == 2**24
    assert _spec(Dtype.int8, QSchemeType.per_channel, ch_axis=63).ch_axis == 63
    assert GPTQConfig(clip_search_steps=1000, damp_percent=1).clip_search_steps == 1000
    assert SmoothQuantConfig(alpha=0, scale_clamp_min=1.0).alpha == 0
    assert AutoSmoothQuantConfig().compute_scale_loss == "MSE"
    assert not math.isnan(GPTQConfig(damp_percent=1e-9).damp_percent)
