"""AWQ, GPTQ, SmoothQuant and AutoSmoothQuant end to end through ModelQuantizer on tiny models.

Each algorithm is compared with plain round-to-nearest (the same spec, no algorithm) on the
error of the model outputs (logits) for held-out batches, measured here.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from tiny_models import make_batches, make_model

from quark.torch import ModelQuantizer
from quark.torch.algorithm.api import apply_advanced_algorithm, apply_pre_quant_optimization
from quark.torch.quantization.config.config import (
    AutoSmoothQuantConfig,
    AWQConfig,
    Config,
    GPTQConfig,
    QuantizationConfig,
    SmoothQuantConfig,
)
from quark.torch.quantization.config.custom_config import (
    BFLOAT16_SPEC,
    INT4_PER_CHANNEL_SPEC,
    INT4_PER_GROUP_SYM_SPEC,
    INT8_PER_CHANNEL_SPEC,
    INT8_PER_TENSOR_SPEC,
    MXFP4_SPEC,
    UINT4_PER_GROUP_ASYM_SPEC,
)

CALIB = make_batches(8, seq=64, seed=1)
HELD_OUT = make_batches(2, seq=64, seed=2)


def _config(weight, algo=None, pre=None, act=None):
    return Config(global_quant_config=QuantizationConfig(weight=weight, input_tensors=act), exclude=["lm_head"],
                  algo_config=algo, pre_quant_opt_config=pre or [])


def _error(model, config) -> float:
    q = copy.deepcopy(model)
    ModelQuantizer(config).quantize_model(q, CALIB)
    with torch.no_grad():
        return sum(float(((q(b).logits - model(b).logits) ** 2).mean()) for b in HELD_OUT)


def _g(spec, group):
    return replace(spec, group_size=group)


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2", "mistral", "phi3"])
@pytest.mark.parametrize("clip_in_scale_search", [True, False])
def test_awq_beats_rtn(family, clip_in_scale_search):
    model = make_model(family)
    spec = _g(UINT4_PER_GROUP_ASYM_SPEC, 32)
    rtn = _error(model, _config(spec))
    awq = _error(model, _config(spec, AWQConfig(clip_in_scale_search=clip_in_scale_search)))
    assert awq < rtn, (awq, rtn)


@pytest.mark.parametrize("family,spec", [
    ("llama", _g(INT4_PER_GROUP_SYM_SPEC, 32)),
    ("opt", _g(UINT4_PER_GROUP_ASYM_SPEC, 32)),
    ("qwen2", INT4_PER_CHANNEL_SPEC),
    ("mistral", INT8_PER_CHANNEL_SPEC),
    ("phi3", _g(INT4_PER_GROUP_SYM_SPEC, 32)),
])
def test_gptq_beats_rtn_and_fixes_grid(family, spec):
    model = make_model(family)
    rtn = _error(model, _config(spec))
    q = copy.deepcopy(model)
    ModelQuantizer(_config(spec, GPTQConfig())).quantize_model(q, CALIB)
    with torch.no_grad():
        gptq = sum(float(((q(b).logits - model(b).logits) ** 2).mean()) for b in HELD_OUT)
        # GPTQ's weights lie on the grid it fixed: fake-quantizing them changes nothing.
        lin = [m for m in q.modules() if getattr(m, "weight_quantizer", None) is not None][-2]
        assert lin.weight_quantizer.qparams_fixed
        assert torch.allclose(lin.weight_quantizer(lin.weight), lin.weight, atol=1e-6)
    assert gptq < rtn, (gptq, rtn)


def test_gptq_true_sequential_off_and_inside_layer_modules():
    model = make_model("llama")
    spec = _g(INT4_PER_GROUP_SYM_SPEC, 32)
    cfg = GPTQConfig(true_sequential=False, desc_act=False, inside_layer_modules=["mlp.down_proj"],
                     model_decoder_layers="model.layers")
    q = copy.deepcopy(model)
    ModelQuantizer(_config(spec, cfg)).quantize_model(q, CALIB)
    layer = q.model.layers[0]
    assert layer.mlp.down_proj.weight_quantizer.qparams_fixed
    assert not layer.mlp.up_proj.weight_quantizer.qparams_fixed


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_smoothquant_preserves_float_and_helps_w8a8(family):
    model = make_model(family)
    smoothed = copy.deepcopy(model)
    apply_pre_quant_optimization(smoothed, [SmoothQuantConfig(alpha=0.5)], _config(INT8_PER_TENSOR_SPEC),
                                 CALIB, "cpu")
    with torch.no_grad():
        for b in HELD_OUT:
            # Tolerance: float32 rescaling error only.
            assert torch.allclose(smoothed(b).logits, model(b).logits, atol=1e-4, rtol=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(smoothed.parameters(), model.parameters()))
    plain = _error(model, _config(INT8_PER_TENSOR_SPEC, act=INT8_PER_TENSOR_SPEC))
    sq = _error(model, _config(INT8_PER_TENSOR_SPEC, pre=[SmoothQuantConfig(alpha=0.5)], act=INT8_PER_TENSOR_SPEC))
    assert sq < plain, (sq, plain)


def test_autosmoothquant_helps_w8a8():
    model = make_model("qwen2")
    plain = _error(model, _config(INT8_PER_TENSOR_SPEC, act=INT8_PER_TENSOR_SPEC))
    auto = _error(model, _config(INT8_PER_TENSOR_SPEC, act=INT8_PER_TENSOR_SPEC,
                                 pre=[AutoSmoothQuantConfig(compute_scale_loss="MSE")]))
    assert auto < plain, (auto, plain)


def test_autosmoothquant_mae_preserves_float_and_rejects_bad_loss():
    model = make_model("llama")
    smoothed = copy.deepcopy(model)
    config = _config(INT8_PER_TENSOR_SPEC, act=INT8_PER_TENSOR_SPEC)
    apply_pre_quant_optimization(smoothed, [AutoSmoothQuantConfig(compute_scale_loss="MAE")], config,
                                 CALIB[:2], "cpu")
    with torch.no_grad():
        assert torch.allclose(smoothed(HELD_OUT[0]).logits, model(HELD_OUT[0]).logits, atol=1e-4, rtol=1e-4)
    bad = AutoSmoothQuantConfig()
    object.__setattr__(bad, "compute_scale_loss", "L3")
    with pytest.raises(ValueError, match="compute_scale_loss"):
        apply_pre_quant_optimization(smoothed, [bad], config, CALIB[:2], "cpu")


def test_unsupported_specs_raise_before_weights_change():
    model = make_model("llama")
    before = copy.deepcopy(model.state_dict())
    for weight, algo, field in [
        (BFLOAT16_SPEC, AWQConfig(), "dtype=bfloat16 is a plain cast"),
        (_g(INT4_PER_GROUP_SYM_SPEC, 48), GPTQConfig(), "group_size"),
        (_g(MXFP4_SPEC, 48), GPTQConfig(), "group_size 48"),
    ]:
        with pytest.raises(ValueError, match=field):
            ModelQuantizer(_config(weight, algo)).quantize_model(model, CALIB)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bad_scaling_layer_name_raises():
    model = make_model("llama")
    groups = [{"prev_op": "input_layernorm", "layers": ["self_attn.q_projj"], "inp": "self_attn.q_projj"}]
    with pytest.raises(ValueError, match="q_projj"):
        apply_advanced_algorithm(model, [AWQConfig(scaling_layers=groups)], _config(_g(INT4_PER_GROUP_SYM_SPEC, 32)),
                                 CALIB, "cpu")
    with pytest.raises(ValueError, match="q_projj"):
        apply_pre_quant_optimization(model, [SmoothQuantConfig(scaling_layers=groups)], _config(INT8_PER_TENSOR_SPEC),
                                     CALIB, "cpu")


def test_fused_producers_of_the_phi3_template():
    """Phi3's template scales qkv_proj -> o_proj and gate_up_proj -> down_proj: only the slice of the
    fused producer that the consumer reads (the values, the up half) may be rescaled."""
    from quark.torch import LLMTemplate
    from quark.torch.algorithm.utils.model_info import ScalingGroup
    from quark.torch.algorithm.utils.scaling_step import producer_slice
    from quark.torch.quantization.calibration.layerwise import capture_decoder_inputs

    model = make_model("phi3")
    template = LLMTemplate.get("phi3")
    layer = model.model.layers[0]
    cache = capture_decoder_inputs(model, CALIB[:1], model.model.layers)
    inputs = [(cache.args[0], cache.kwargs[0])]
    attn = layer.self_attn
    kv_rows = attn.config.num_key_value_heads * attn.head_dim
    qkv = ScalingGroup(prev_op="self_attn.qkv_proj", layers=["self_attn.o_proj"], inp="self_attn.o_proj")
    assert producer_slice(layer, qkv, inputs, "test") == (attn.qkv_proj.out_features - kv_rows, kv_rows)
    inter = layer.mlp.down_proj.in_features
    up = ScalingGroup(prev_op="mlp.gate_up_proj", layers=["mlp.down_proj"], inp="mlp.down_proj")
    assert producer_slice(layer, up, inputs, "test") == (inter, inter)

    smooth = template.get_config(scheme="int8", algorithm="smoothquant")
    smoothed = copy.deepcopy(model)
    assert isinstance(smooth.algo_config[0], SmoothQuantConfig)
    apply_pre_quant_optimization(smoothed, smooth.algo_config, smooth, CALIB, "cpu")
    with torch.no_grad():
        for b in HELD_OUT:
            assert torch.allclose(smoothed(b).logits, model(b).logits, atol=1e-4, rtol=1e-4)
    # the value rows were divided by the qkv -> o_proj scales on top of the norm group's column scales
    ratio = smoothed.model.layers[0].self_attn.qkv_proj.weight / model.model.layers[0].self_attn.qkv_proj.weight
    column = ratio[0]  # q rows carry only the norm group's per-column factors
    row_factor = (ratio / column).median(dim=1).values
    assert torch.allclose(row_factor[:-kv_rows], torch.ones_like(row_factor[:-kv_rows]), rtol=1e-3)
    assert not torch.allclose(row_factor[-kv_rows:], torch.ones_like(row_factor[-kv_rows:]), rtol=1e-3)

    spec = _g(UINT4_PER_GROUP_ASYM_SPEC, 32)
    awq_cfg = template.get_config(scheme="uint4_wo_32", algorithm="awq")
    assert any(g["prev_op"] == "self_attn.qkv_proj" for g in awq_cfg.algo_config[0].scaling_layers)
    rtn = _error(model, _config(spec))
    awq = _error(model, _config(spec, awq_cfg.algo_config))
    assert awq < rtn, (awq, rtn)


def _tiny_moe():
    import transformers

    from quark.torch.llm import moe

    cfg = transformers.Qwen2MoeConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                      max_position_embeddings=128, num_key_value_heads=2, intermediate_size=128,
                                      num_experts_per_tok=2, moe_intermediate_size=64,
                                      shared_expert_intermediate_size=128, num_experts=4)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    moe.unfuse_experts(model)
    return model


def test_scaling_algorithms_on_moe_and_rotation_refusal():
    """Discovery must not probe through the router (perturbing it re-routes tokens); rotation says why it refuses."""
    model = _tiny_moe()
    calib = make_batches(2, seq=32, seed=1)
    for algo, spec, act in ((AWQConfig(), _g(UINT4_PER_GROUP_ASYM_SPEC, 32), None),
                            (SmoothQuantConfig(alpha=0.5), INT8_PER_TENSOR_SPEC, INT8_PER_TENSOR_SPEC)):
        q = copy.deepcopy(model)
        cfg = _config(spec, algo=[algo] if isinstance(algo, AWQConfig) else None,
                      pre=[algo] if isinstance(algo, SmoothQuantConfig) else None, act=act)
        ModelQuantizer(cfg).quantize_model(q, calib)
        with torch.no_grad():
            assert torch.isfinite(q(calib[0]).logits).all()
    from quark.torch.quantization.config.config import RotationConfig

    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ValueError, match="mixture-of-experts"):
        apply_pre_quant_optimization(model, [RotationConfig()], _config(INT8_PER_TENSOR_SPEC), calib, "cpu")
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
