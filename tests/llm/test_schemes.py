"""Recipe scheme names -> configs: the specs each recipe promises, JSON round trips, bad input."""

from __future__ import annotations

import pytest

from quark.torch.llm import schemes
from quark.torch.quantization.config.config import Config, QuaRotConfig
from quark.torch.quantization.config.template import LLMTemplate
from quark.torch.quantization.config.type import Dtype, QSchemeType

LLAMA = LLMTemplate.get("llama")


def build(scheme: str, **kw) -> Config:
    return schemes.build_config(LLAMA, schemes.SchemeRequest(scheme, **kw))


@pytest.mark.parametrize("name", schemes.scheme_names())
def test_every_scheme_builds_and_round_trips(name: str) -> None:
    config = build(name)
    assert config.exclude == ["lm_head"]
    assert Config.from_dict(config.to_dict()) == config
    assert config.global_quant_config.weight is not None


def test_recipe_registry_left_untouched() -> None:
    before = LLMTemplate.list_schemes()
    build("w_fp8_a_fp8")
    assert LLMTemplate.list_schemes() == before


@pytest.mark.parametrize(("name", "weight", "qscheme", "group", "act"), [
    ("w_fp8_a_fp8", Dtype.fp8_e4m3, QSchemeType.per_tensor, None, Dtype.fp8_e4m3),
    ("w_int4_per_group_sym", Dtype.int4, QSchemeType.per_group, 128, None),
    ("w_uint4_per_group_asym", Dtype.uint4, QSchemeType.per_group, 128, None),
    ("w_int8_a_int8_per_tensor_sym", Dtype.int8, QSchemeType.per_tensor, None, Dtype.int8),
    ("w_mxfp8", Dtype.fp8_e4m3, QSchemeType.per_group, 32, None),
    ("w_mxfp8_a_mxfp8", Dtype.fp8_e4m3, QSchemeType.per_group, 32, Dtype.fp8_e4m3),
    ("w_bfp16", Dtype.bfp16, QSchemeType.per_group, 8, None),  # blocks of the formats table
    ("w_bfp16_a_bfp16", Dtype.bfp16, QSchemeType.per_group, 8, Dtype.bfp16),
    ("w_mx6", Dtype.mx6, QSchemeType.per_group, 16, None),
    ("w_mx6_a_mx6", Dtype.mx6, QSchemeType.per_group, 16, Dtype.mx6),
    ("w_int4_per_channel_sym", Dtype.int4, QSchemeType.per_channel, None, None),
])
def test_recipe_specs(name: str, weight: Dtype, qscheme: QSchemeType, group: int | None, act: Dtype | None) -> None:
    g = build(name).global_quant_config
    assert g.weight.dtype == weight and g.weight.qscheme == qscheme and g.weight.group_size == group
    assert not g.weight.is_dynamic
    assert (g.input_tensors.dtype if g.input_tensors else None) == act
    if name == "w_uint4_per_group_asym":
        assert g.weight.symmetric is False
    if name in ("w_int4_per_group_sym", "w_int4_per_channel_sym", "w_int8_a_int8_per_tensor_sym"):
        assert g.weight.symmetric is True
    if name == "w_int4_per_channel_sym":
        assert g.weight.ch_axis == 0  # one scale per output channel
    if act is not None and name.startswith(("w_mx", "w_bfp")):
        assert g.input_tensors.is_dynamic


@pytest.mark.parametrize("name", ["w_fp4_scale_fp8", "w_fp4_a_fp4_scale_fp8"])
def test_two_stage_fp4_with_fp8_scales(name: str) -> None:
    g = build(name).global_quant_config
    first, second = g.weight
    assert first.dtype == Dtype.fp4 and first.qscheme == QSchemeType.per_group and first.group_size == 16
    assert second.dtype == Dtype.fp8_e4m3 and second.qscheme == QSchemeType.per_tensor and second.is_scale_quant
    if name == "w_fp4_a_fp4_scale_fp8":
        a_first, a_second = g.input_tensors
        assert a_first.dtype == Dtype.fp4 and a_first.is_dynamic and a_second.is_scale_quant
    else:
        assert g.input_tensors is None


def test_group_size_and_kv_cache() -> None:
    config = build("w_uint4_per_group_asym", group_size=32, kv_cache_dtype="fp8")
    assert config.global_quant_config.weight.group_size == 32
    assert set(config.kv_cache_quant_config) == {"*k_proj", "*v_proj"}
    kv = config.layer_quant_config["*k_proj"]
    assert kv.output_tensors.dtype == Dtype.fp8_e4m3 and kv.weight.group_size == 32


def test_algorithms_in_order_and_quarot() -> None:
    config = build("w_int4_per_group_sym", algorithms=["awq", "gptq"])
    assert [a.name for a in config.algo_config] == ["awq", "gptq"]
    quarot = build("w_int8_a_int8_per_tensor_sym", algorithms=["quarot"], kv_cache_dtype="fp8")
    (algo,) = quarot.algo_config
    assert isinstance(algo, QuaRotConfig) and algo.kv_cache_quant and algo.act_quant


def test_kv_cache_post_rope() -> None:
    assert not build("w_fp8_a_fp8", kv_cache_dtype="fp8").kv_cache_post_rope
    assert build("w_fp8_a_fp8", kv_cache_dtype="fp8", kv_cache_post_rope=True).kv_cache_post_rope


def test_moe_second_step_pattern() -> None:
    config = build("w_fp8_a_fp8", moe_second_step="w_int4_per_channel_sym")
    experts = config.layer_quant_config["*experts.*"]
    assert experts.weight.dtype == Dtype.int4 and experts.weight.qscheme == QSchemeType.per_channel
    assert experts.input_tensors == config.global_quant_config.input_tensors


@pytest.mark.parametrize(("kw", "match"), [
    ({"group_size": 64, "scheme": "w_mxfp8"}, "fixed at 32"),
    ({"group_size": 64, "scheme": "w_fp8_a_fp8"}, "not a per-group scheme"),
    ({"group_size": 64, "scheme": "int4_wo_128"}, "part of its name"),
    ({"kv_cache_dtype": "int8", "scheme": "w_fp8_a_fp8"}, "kv_cache_dtype='int8' is not one of: fp8"),
    ({"scheme": "w_int2"}, "known: w_fp8_a_fp8"),
    ({"moe_second_step": "w_int8", "scheme": "w_fp8_a_fp8"}, "w_int4_per_channel_sym"),
    ({"kv_cache_post_rope": True, "scheme": "w_fp8_a_fp8"}, "needs --kv_cache_dtype"),
])
def test_bad_requests(kw: dict, match: str) -> None:
    scheme = kw.pop("scheme")
    with pytest.raises(ValueError, match=match):
        build(scheme, **kw)


def test_parse_algorithms() -> None:
    assert schemes.parse_algorithms("rotation, gptq") == ["rotation", "gptq"]
    with pytest.raises(ValueError, match="awq, gptq, smoothquant, autosmoothquant, rotation, quarot"):
        schemes.parse_algorithms("omniquant")


def test_unknown_model_type_gets_generic_template() -> None:
    template = schemes.template_for("brand_new_llm")
    assert template.exclude_layers == ["lm_head"] and template.kv_layer_name == ["*k_proj", "*v_proj"]
