"""Tests of quark/torch/quantization/config/template.py and the family data in templates/."""

from __future__ import annotations

import fnmatch

import pytest
import torch.nn as nn
import transformers

from quark.torch.quantization.config.config import (
    AWQConfig,
    Config,
    GPTQConfig,
    Int8PerTensorSpec,
    QuantizationConfig,
    RotationConfig,
    SmoothQuantConfig,
)
from quark.torch.quantization.config.template import LLMTemplate, isolated_registry, set_algo_config_fallback
from quark.torch.quantization.config.templates import all_families, recent
from quark.torch.quantization.config.type import Dtype, QSchemeType


@pytest.fixture(autouse=True)
def _registry():
    with isolated_registry():
        yield


def roundtrip(config: Config) -> Config:
    assert isinstance(config, Config)
    assert Config.from_dict(config.to_dict()) == config
    return config


# ------------------------------------------------------------------------------ seed blocks
def test_seed_section1_builtin_templates():
    from quark.torch import LLMTemplate

    templates = LLMTemplate.list_available()
    print(templates)  # ['llama', 'opt', 'qwen', 'mistral', ...]
    llama_template = LLMTemplate.get("llama")
    config = llama_template.get_config(scheme="fp8", kv_cache_scheme="fp8")

    assert {"llama", "opt", "qwen", "mistral"} <= set(templates)
    assert config.global_quant_config.weight.dtype == Dtype.fp8_e4m3
    assert set(config.kv_cache_quant_config) == {"*k_proj", "*v_proj"}
    roundtrip(config)


def test_seed_section2_advanced_options():
    import torch.nn as nn

    from quark.torch import LLMTemplate

    llama_template = LLMTemplate.get("llama")
    config = llama_template.get_config(
        scheme="int4_wo_128",
        algorithm="awq",
        kv_cache_scheme="fp8",
        min_kv_scale=1.0,
        attention_scheme="fp8",
        layer_config={"*.mlp.gate_proj": "mxfp4", "*.mlp.up_proj": "mxfp4", "*.mlp.down_proj": "mxfp4"},
        layer_type_config={nn.LayerNorm: "fp8"},
        exclude_layers=["lm_head"],
    )
    assert config.layer_quant_config["*.mlp.up_proj"].weight.dtype == Dtype.fp4
    assert config.layer_type_quant_config[nn.LayerNorm].weight.dtype == Dtype.fp8_e4m3
    assert config.min_kv_scale == 1.0
    assert config.softmax_quant_spec.dtype == Dtype.fp8_e4m3
    assert [type(a) for a in config.algo_config] == [AWQConfig]
    assert config.exclude == ["lm_head"]
    roundtrip(config)


def test_seed_section3_new_template():
    from quark.torch import LLMTemplate

    template = LLMTemplate(model_type="kimi_k2", kv_layer_name=["*kv_b_proj"], exclude_layers=["lm_head"])
    LLMTemplate.register_template(template)
    template = LLMTemplate.get("kimi_k2")
    config = template.get_config(scheme="fp8", kv_cache_scheme="fp8")

    assert set(config.kv_cache_quant_config) == {"*kv_b_proj"}
    assert config.layer_quant_config["*kv_b_proj"].output_tensors.dtype == Dtype.fp8_e4m3
    roundtrip(config)


def test_seed_section3_registration_does_not_leak():
    assert "kimi_k2" not in LLMTemplate.list_available()


def test_seed_section4_custom_scheme():
    from quark.torch import LLMTemplate
    from quark.torch.quantization.config.config import Int8PerTensorSpec, QuantizationConfig

    quant_spec = Int8PerTensorSpec(
        observer_method="min_max",
        symmetric=True,
        scale_type="float",
        round_method="half_even",
        is_dynamic=False,
    ).to_quantization_spec()
    global_config = QuantizationConfig(weight=quant_spec)
    LLMTemplate.register_scheme("custom_int8_wo", config=global_config)
    llama_template = LLMTemplate.get("llama")
    config = llama_template.get_config(scheme="custom_int8_wo")

    assert config.global_quant_config == global_config
    assert config.global_quant_config is not global_config
    assert "custom_int8_wo" in LLMTemplate.list_schemes()
    roundtrip(config)


def test_seed_section4_scheme_registration_does_not_leak():
    assert "custom_int8_wo" not in LLMTemplate.list_schemes()


# ------------------------------------------------------------------------------ schemes
# scheme -> (weight dtype, qscheme, group_size, symmetric, input spec: None or (dtype, dynamic))
SCHEME_TABLE = {
    "int4_wo_128": (Dtype.int4, QSchemeType.per_group, 128, True, None),
    "int4_wo_64": (Dtype.int4, QSchemeType.per_group, 64, True, None),
    "int4_wo_32": (Dtype.int4, QSchemeType.per_group, 32, True, None),
    "uint4_wo_128": (Dtype.uint4, QSchemeType.per_group, 128, False, None),
    "uint4_wo_64": (Dtype.uint4, QSchemeType.per_group, 64, False, None),
    "uint4_wo_32": (Dtype.uint4, QSchemeType.per_group, 32, False, None),
    "int8": (Dtype.int8, QSchemeType.per_tensor, None, True, (Dtype.int8, False)),
    "fp8": (Dtype.fp8_e4m3, QSchemeType.per_tensor, None, None, (Dtype.fp8_e4m3, False)),
    "mxfp4": (Dtype.fp4, QSchemeType.per_group, 32, None, (Dtype.fp4, True)),
    "mxfp6_e2m3": (Dtype.fp6_e2m3, QSchemeType.per_group, 32, None, (Dtype.fp6_e2m3, True)),
    "mxfp6_e3m2": (Dtype.fp6_e3m2, QSchemeType.per_group, 32, None, (Dtype.fp6_e3m2, True)),
    "mx6": (Dtype.mx6, QSchemeType.per_group, 16, None, (Dtype.mx6, True)),
    "bfp16": (Dtype.bfp16, QSchemeType.per_group, 8, None, (Dtype.bfp16, True)),
}


def test_builtin_schemes_are_exactly_the_table():
    assert LLMTemplate.list_schemes() == list(SCHEME_TABLE)


@pytest.mark.parametrize("model_type", ["llama", "opt", "phi3", "qwen2_moe"])
@pytest.mark.parametrize("scheme", list(SCHEME_TABLE))
def test_scheme_specs(scheme, model_type):
    dtype, qscheme, group, symmetric, act = SCHEME_TABLE[scheme]
    config = roundtrip(LLMTemplate.get(model_type).get_config(scheme=scheme))
    g = config.global_quant_config
    w = g.weight
    assert (w.dtype, w.qscheme, w.group_size, w.is_dynamic) == (dtype, qscheme, group, False)
    if symmetric is not None:
        assert w.symmetric is symmetric
    if qscheme == QSchemeType.per_group:
        assert w.ch_axis == -1
    if scheme.startswith("mxfp"):
        assert w.scale_format == "e8m0"
    if act is None:
        assert g.input_tensors is None
    else:
        assert (g.input_tensors.dtype, g.input_tensors.is_dynamic, g.input_tensors.group_size) == (
            *act,
            group,
        )
    assert g.output_tensors is None and g.bias is None
    assert config.layer_quant_config == {} and config.kv_cache_quant_config == {}
    assert config.algo_config is None and config.softmax_quant_spec is None


def test_scheme_configs_are_fresh_objects():
    a = LLMTemplate.get("llama").get_config(scheme="fp8")
    b = LLMTemplate.get("llama").get_config(scheme="fp8")
    assert a == b and a.global_quant_config.weight is not b.global_quant_config.weight


# ------------------------------------------------------------------------------ kv cache / attention
def test_kv_cache_fp8_entries():
    config = roundtrip(
        LLMTemplate.get("llama").get_config(scheme="int8", kv_cache_scheme="fp8", min_kv_scale=0.5)
    )
    g = config.global_quant_config
    assert config.min_kv_scale == 0.5
    for key in ("*k_proj", "*v_proj"):
        for table in (config.layer_quant_config, config.kv_cache_quant_config):
            entry = table[key]
            assert entry.weight == g.weight and entry.input_tensors == g.input_tensors
            out = entry.output_tensors
            assert (out.dtype, out.qscheme, out.is_dynamic) == (Dtype.fp8_e4m3, QSchemeType.per_tensor, False)
    assert config.softmax_quant_spec is None


def test_kv_cache_takes_weight_from_matching_layer_config_then_layer_type():
    t = LLMTemplate.get("llama")
    config = roundtrip(
        t.get_config(scheme="fp8", kv_cache_scheme="fp8", layer_config={"*proj": "int4_wo_64"})
    )
    assert config.layer_quant_config["*k_proj"].weight.group_size == 64
    config = roundtrip(
        t.get_config(scheme="fp8", kv_cache_scheme="fp8", layer_type_config={nn.Linear: "int8"})
    )
    assert config.layer_quant_config["*v_proj"].weight.dtype == Dtype.int8
    config = roundtrip(t.get_config(scheme="fp8", kv_cache_scheme="fp8", exclude_layers=["*k_proj"]))
    assert config.kv_cache_quant_config["*k_proj"].weight is None
    assert config.kv_cache_quant_config["*k_proj"].output_tensors.dtype == Dtype.fp8_e4m3
    assert config.kv_cache_quant_config["*v_proj"].weight.dtype == Dtype.fp8_e4m3


def test_attention_fp8_quantizes_query_and_softmax():
    config = roundtrip(LLMTemplate.get("mistral").get_config(scheme="uint4_wo_32", attention_scheme="fp8"))
    assert config.softmax_quant_spec.dtype == Dtype.fp8_e4m3 and not config.softmax_quant_spec.is_dynamic
    q = config.layer_quant_config["*q_proj"]
    assert q.output_tensors.dtype == Dtype.fp8_e4m3 and q.weight.dtype == Dtype.uint4
    assert config.kv_cache_quant_config == {}


def test_fused_qkv_template_kv_and_attention_share_one_entry():
    config = roundtrip(
        LLMTemplate.get("phi3").get_config(scheme="fp8", kv_cache_scheme="fp8", attention_scheme="fp8")
    )
    assert list(config.layer_quant_config) == ["*qkv_proj"]
    assert config.layer_quant_config["*qkv_proj"] == config.kv_cache_quant_config["*qkv_proj"]


# ------------------------------------------------------------------------------ overrides / exclude
def test_layer_and_layer_type_overrides():
    config = roundtrip(
        LLMTemplate.get("opt").get_config(
            scheme="int8",
            layer_config={"*fc1": "bfp16", "*fc2": "uint4_wo_32"},
            layer_type_config={nn.Linear: "fp8", nn.Embedding: "int4_wo_64"},
        )
    )
    assert config.global_quant_config.weight.dtype == Dtype.int8
    assert config.layer_quant_config["*fc1"].weight.dtype == Dtype.bfp16
    assert config.layer_quant_config["*fc2"].weight.group_size == 32
    assert config.layer_type_quant_config[nn.Linear].weight.dtype == Dtype.fp8_e4m3
    assert config.layer_type_quant_config[nn.Embedding].weight.dtype == Dtype.int4


@pytest.mark.parametrize("family", all_families(), ids=lambda f: f["model_type"])
def test_exclude_defaults_and_override(family):
    t = LLMTemplate.get(family["model_type"])
    assert roundtrip(t.get_config(scheme="fp8")).exclude == family["exclude"]
    assert t.get_config(scheme="fp8", exclude_layers=["*mlp*"]).exclude == ["*mlp*"]
    assert t.get_config(scheme="fp8", exclude_layers=[]).exclude == []


def test_moe_templates_exclude_routers():
    assert "*.gate" in LLMTemplate.get("mixtral").exclude_layers
    assert "*.shared_expert_gate" in LLMTemplate.get("qwen2_moe").exclude_layers
    assert "*router.layer" in LLMTemplate.get("dbrx").exclude_layers


# ------------------------------------------------------------------------------ algorithms
def test_algorithm_list_order_and_paths():
    t = LLMTemplate.get("llama")
    config = roundtrip(t.get_config(scheme="int4_wo_128", algorithm="rotation, smoothquant,gptq"))
    assert [a.name for a in config.algo_config] == ["rotation", "smoothquant", "gptq"]
    for algo in config.algo_config:
        assert algo.model_decoder_layers == "model.layers" and algo.embedding_layers == ["model.embed_tokens"]
    assert config == t.get_config(scheme="int4_wo_128", algorithm=["rotation", "smoothquant", "gptq"])
    config.algo_config[0].scaling_layers.clear()  # the template keeps its own copy
    assert t.rotation_config.scaling_layers


def test_user_algo_config_gets_template_paths():
    t = LLMTemplate(
        model_type="toy",
        model_decoder_layers="m.blocks",
        embedding_layers=["m.wte"],
        gptq_config=GPTQConfig(inside_layer_modules=["fc"]),
    )
    algo = roundtrip(t.get_config(scheme="int4_wo_32", algorithm="gptq")).algo_config[0]
    assert (algo.model_decoder_layers, algo.embedding_layers, algo.inside_layer_modules) == (
        "m.blocks",
        ["m.wte"],
        ["fc"],
    )


def test_missing_algorithm_data_discovers_raises_or_uses_fallback():
    t = LLMTemplate.get("dbrx")
    default = t.get_config(scheme="int4_wo_128", algorithm="awq").algo_config[0]
    assert default.scaling_layers is None  # discovered from the model when the algorithm runs
    assert default.model_decoder_layers == "transformer.blocks"
    previous = set_algo_config_fallback(None)
    with pytest.raises(ValueError, match=r"'dbrx'.*awq"):
        t.get_config(scheme="int4_wo_128", algorithm="awq")
    calls = []

    def fallback(template, name):
        calls.append((template.model_type, name))
        return SmoothQuantConfig(alpha=0.7)

    assert set_algo_config_fallback(fallback) is None
    set_algo_config_fallback(previous)
    set_algo_config_fallback(fallback)
    config = t.get_config(scheme="int8", algorithm="smoothquant")
    assert calls == [("dbrx", "smoothquant")] and config.algo_config[0].alpha == 0.7
    assert config.algo_config[0].model_decoder_layers == "transformer.blocks"


# ------------------------------------------------------------------------------ registry / lookup
def test_get_unknown_lists_templates():
    with pytest.raises(ValueError, match=r"no_such_model.*llama"):
        LLMTemplate.get("no_such_model")


def test_register_template_conflicts():
    t = LLMTemplate(model_type="toy", kv_layer_name=["*k"])
    LLMTemplate.register_template(t)
    LLMTemplate.register_template(LLMTemplate(model_type="toy", kv_layer_name=["*k"]))  # equal: no-op
    other = LLMTemplate(model_type="toy", kv_layer_name=["*kv"])
    with pytest.raises(ValueError, match="overwrite=True"):
        LLMTemplate.register_template(other)
    LLMTemplate.register_template(other, overwrite=True)
    assert LLMTemplate.get("toy").kv_layer_name == ["*kv"]
    with pytest.raises(ValueError, match="LLMTemplate"):
        LLMTemplate.register_template("llama")  # type: ignore[arg-type]


def test_register_scheme_conflicts():
    a = QuantizationConfig(weight=Int8PerTensorSpec().to_quantization_spec())
    b = QuantizationConfig(weight=Int8PerTensorSpec(symmetric=False).to_quantization_spec())
    with pytest.raises(ValueError, match="built-in"):
        LLMTemplate.register_scheme("fp8", a)
    LLMTemplate.register_scheme("mine", a)
    LLMTemplate.register_scheme("mine", a)
    with pytest.raises(ValueError, match="overwrite=True"):
        LLMTemplate.register_scheme("mine", b)
    LLMTemplate.register_scheme("mine", b, overwrite=True)
    assert LLMTemplate.get("llama").get_config(scheme="mine").global_quant_config == b
    with pytest.raises(ValueError, match="QuantizationConfig"):
        LLMTemplate.register_scheme("x", Int8PerTensorSpec())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheme": "int3"}, r"scheme='int3'.*int4_wo_128.*bfp16"),
        ({"scheme": "fp8", "algorithm": "magic"}, r"algorithm='magic'.*awq"),
        ({"scheme": "fp8", "algorithm": "awq,awq"}, "twice"),
        ({"scheme": "fp8", "kv_cache_scheme": "int8"}, r"kv_cache_scheme='int8'.*fp8"),
        ({"scheme": "fp8", "attention_scheme": "mxfp4"}, r"attention_scheme='mxfp4'.*fp8"),
        ({"scheme": "fp8", "min_kv_scale": -1.0}, "min_kv_scale"),
        ({"scheme": "fp8", "layer_config": {"*fc1": "nope"}}, r"layer_config\['\*fc1'\]='nope'"),
        ({"scheme": "fp8", "layer_type_config": {"Linear": "fp8"}}, "nn.Module subclass"),
        ({"scheme": "fp8", "layer_type_config": {nn.Linear: "nope"}}, "layer_type_config"),
        ({"scheme": "fp8", "exclude_layers": "lm_head?"}, None),
        ({"scheme": "fp8", "exclude_layers": [3]}, "exclude_layers"),
    ],
)
def test_get_config_errors(kwargs, match):
    if match is None:  # a bare string is read as one pattern
        assert LLMTemplate.get("opt").get_config(**kwargs).exclude == ["lm_head?"]
        return
    with pytest.raises(ValueError, match=match):
        LLMTemplate.get("opt").get_config(**kwargs)


def test_kv_cache_without_kv_names_raises():
    with pytest.raises(ValueError, match="kv_layer_name"):
        LLMTemplate(model_type="bare").get_config(scheme="fp8", kv_cache_scheme="fp8")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model_type": ""}, "model_type"),
        ({"model_type": "x", "kv_layer_name": [1]}, "kv_layer_name"),
        ({"model_type": "x", "awq_config": GPTQConfig()}, "awq_config"),
        ({"model_type": "x", "model_decoder_layers": 5}, "model_decoder_layers"),
    ],
)
def test_template_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLMTemplate(**kwargs)


def test_get_model_type():
    assert LLMTemplate.get_model_type(transformers.OPTConfig()) == "opt"
    assert LLMTemplate.get_model_type({"architectures": ["Grok1ModelForCausalLM"]}) == "Grok1ModelForCausalLM"

    class Wrapped(nn.Module):
        config = {"model_type": "grok-1", "architectures": ["Grok1ModelForCausalLM"]}

    assert LLMTemplate.get_model_type(Wrapped()) == "grok-1"
    with pytest.raises(ValueError, match="model_type"):
        LLMTemplate.get_model_type({})


# ------------------------------------------------------------------------------ names vs transformers
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)
TINY_CONFIGS = {
    "LlamaForCausalLM": lambda: transformers.LlamaConfig(**_COMMON),
    "Qwen2ForCausalLM": lambda: transformers.Qwen2Config(**_COMMON),
    "MistralForCausalLM": lambda: transformers.MistralConfig(**_COMMON),
    "CohereForCausalLM": lambda: transformers.CohereConfig(**_COMMON),
    "Phi3ForCausalLM": lambda: transformers.Phi3Config(**_COMMON, pad_token_id=0),
    "OPTForCausalLM": lambda: transformers.OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        word_embed_proj_dim=64,
    ),
    "GPTJForCausalLM": lambda: transformers.GPTJConfig(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, rotary_dim=8
    ),
    "PhiForCausalLM": lambda: transformers.PhiConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    ),
    "Qwen2MoeForCausalLM": lambda: transformers.Qwen2MoeConfig(
        **_COMMON,
        moe_intermediate_size=32,
        num_experts=4,
        shared_expert_intermediate_size=64,
        num_experts_per_tok=2,
    ),
    "MixtralForCausalLM": lambda: transformers.MixtralConfig(
        **_COMMON, num_local_experts=4, num_experts_per_tok=2
    ),
    "DbrxForCausalLM": lambda: transformers.DbrxConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        vocab_size=128,
        ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2},
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
    ),
    "MllamaForConditionalGeneration": lambda: transformers.MllamaConfig(
        text_config=transformers.MllamaTextConfig(
            **_COMMON, cross_attention_layers=[1], pad_token_id=0
        ).to_dict(),
        vision_config=transformers.MllamaVisionConfig(
            hidden_size=32,
            intermediate_layers_indices=[0],
            num_hidden_layers=1,
            num_global_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=28,
            patch_size=14,
            vision_output_dim=64,
        ).to_dict(),
    ),
    "Gemma2ForCausalLM": lambda: transformers.Gemma2Config(**_COMMON, head_dim=16),
    "Gemma3ForCausalLM": lambda: transformers.Gemma3TextConfig(**_COMMON, head_dim=16),
    "Gemma3ForConditionalGeneration": lambda: transformers.Gemma3Config(
        text_config=dict(_COMMON, head_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=127, boi_token_index=125, eoi_token_index=126,
    ),
    "Qwen3ForCausalLM": lambda: transformers.Qwen3Config(**_COMMON, head_dim=16),
    "Qwen3MoeForCausalLM": lambda: transformers.Qwen3MoeConfig(
        **_COMMON, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2
    ),
    "Olmo2ForCausalLM": lambda: transformers.Olmo2Config(**_COMMON, pad_token_id=0, eos_token_id=1),
    "GptOssForCausalLM": lambda: transformers.GptOssConfig(
        **_COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "Llama4ForConditionalGeneration": lambda: transformers.Llama4Config(
        text_config=dict(_COMMON, head_dim=16, num_local_experts=2, intermediate_size_mlp=128, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, vision_output_dim=64, projector_input_dim=64,
                           projector_output_dim=64),
    ),
}
HF_FAMILIES = [f for f in all_families() if f["hf_architecture"] is not None]


def test_every_transformers_family_has_a_tiny_config():
    assert {f["hf_architecture"] for f in HF_FAMILIES} == set(TINY_CONFIGS)
    assert {f["model_type"] for f in all_families()} - {f["model_type"] for f in HF_FAMILIES} == {
        "chatglm",
        "qwen",
        "grok-1",
        "deepseek",
    }


@pytest.mark.parametrize("family", HF_FAMILIES, ids=lambda f: f["model_type"])
def test_family_names_exist_in_transformers_model(family):
    arch = family["hf_architecture"]
    model = getattr(transformers, arch)(TINY_CONFIGS[arch]())
    assert LLMTemplate.get_model_type(model) == family["model_type"]
    modules = dict(model.named_modules())
    decoder = model.get_submodule(family["decoder_layers"])
    assert isinstance(decoder, nn.ModuleList) and len(decoder) == 2
    block = dict(decoder[0].named_modules())
    for name in family["embedding_layers"]:
        assert isinstance(modules[name], nn.Embedding)
    for pattern in family["kv_layers"] + family["q_layers"]:
        matched = [n for n in modules if fnmatch.fnmatchcase(n, pattern)]
        assert matched and all(isinstance(modules[n], nn.Linear) for n in matched), pattern
        assert all(n.startswith(family["decoder_layers"]) for n in matched), (pattern, matched)
    assert any(fnmatch.fnmatchcase(n, family["exclude"][0]) for n in modules)
    groups = family.get("scaling_layers", []) + family.get("rotation_layers", [])
    for group in groups:
        assert group["prev_op"] in block, group["prev_op"]
        for name in group["layers"] + [group["inp"]]:
            assert isinstance(block[name], nn.Linear), name
        if group.get("module2inspect"):
            assert group["module2inspect"] in block
    for name in family.get("gptq_modules", []):
        assert isinstance(block[name], nn.Linear), name
    assert "algorithms" in family
    if family.get("algorithms"):
        t = LLMTemplate.get(family["model_type"])
        config = roundtrip(t.get_config(scheme="int4_wo_32", algorithm=family["algorithms"]))
        assert [a.name for a in config.algo_config] == family["algorithms"]


def test_templates_carry_family_algorithm_configs():
    llama = LLMTemplate.get("llama")
    assert isinstance(llama.rotation_config, RotationConfig)
    assert llama.smoothquant_config.alpha == 0.5
    assert LLMTemplate.get("mllama").awq_config is None
    assert LLMTemplate.get("grok-1").autosmoothquant_config is None
    assert "self_attention.query_key_value" in LLMTemplate.get("chatglm").gptq_config.inside_layer_modules


@pytest.mark.parametrize("family", recent.FAMILIES, ids=lambda f: f["model_type"])
def test_newer_families_are_registered_and_discover_their_algorithms(family):
    """``LLMTemplate.get(model_type)`` works for the families newer than the seeds' table, as in the reference;
    their algorithms find the scaling groups in the model (no layer names), on the family's decoder layers."""
    t = LLMTemplate.get(family["model_type"])
    assert family["model_type"] in LLMTemplate.list_available()
    config = roundtrip(t.get_config(scheme="int4_wo_32", algorithm=["awq", "gptq"]))
    awq, gptq = config.algo_config
    assert awq.scaling_layers is None and gptq.inside_layer_modules is None
    assert awq.model_decoder_layers == gptq.model_decoder_layers == family["decoder_layers"]
    assert config.exclude == family["exclude"]
