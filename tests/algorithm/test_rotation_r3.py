"""QuaRot's online R3 (``qk_rotation``): invariance, measured K-cache error reduction, pipeline, export.

The K-cache error is measured, not assumed: the same rotated model (R1, R2, R4) with and without
R3 gets post-RoPE fake quantizers on its keys only (values left in float), calibrated on the same
batches; the error is the mean squared change of the logits when the key quantizers are switched
on. fp8 keeps a relative precision, so an outlier channel that the queries barely read costs it
nothing; the fp8 case therefore gives queries and keys a shared outlier channel pair (massive
q·k terms, as in real attention sinks), the int8 case an outlier in the keys alone.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors import safe_open

from quark.torch import LLMTemplate, ModelExporter, ModelImporter, ModelQuantizer
from quark.torch.algorithm.api import apply_pre_quant_optimization
from quark.torch.quantization.config.config import Config, QuantizationConfig, QuaRotConfig
from quark.torch.quantization.config.custom_config import FP8_PER_TENSOR_SPEC, INT8_PER_TENSOR_SPEC
from quark.torch.quantization.nn.modules.quantize_attention import (
    attach_attention_quantizers,
    quantized_attention_forward,
)
from tests.helpers.tiny_models import tiny_model, token_batches

CALIB = token_batches(4, 16, seed=7)
HEAD_DIM = 16


def outlier_llama(q_factor: float, k_factor: float) -> torch.nn.Module:
    """Tiny Llama whose keys (and, with q_factor > 1, queries) have an outlier channel pair per head."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            for proj, factor in ((layer.self_attn.q_proj, q_factor), (layer.self_attn.k_proj, k_factor)):
                for head in range(proj.out_features // HEAD_DIM):
                    rows = [head * HEAD_DIM + 3, head * HEAD_DIM + 3 + HEAD_DIM // 2]  # one RoPE pair
                    proj.weight[rows] *= factor
    return model


def rotated(model: torch.nn.Module, cfg: QuaRotConfig) -> torch.nn.Module:
    out = copy.deepcopy(model)
    apply_pre_quant_optimization(out, [cfg], Config(global_quant_config=QuantizationConfig()), CALIB, "cpu")
    return out


def key_cache_error(model: torch.nn.Module, spec) -> float:
    model = copy.deepcopy(model)
    kv = QuantizationConfig(output_tensors=spec)
    attach_attention_quantizers(model, Config(global_quant_config=QuantizationConfig(), kv_cache_post_rope=True,
                                              kv_cache_quant_config={"*k_proj": kv, "*v_proj": kv}))
    attns = [layer.self_attn for layer in model.model.layers]
    error = 0.0
    with torch.no_grad():
        for x in CALIB:
            model(x)
        for a in attns:
            a.key_quantizer.finalize()
            a.value_quantizer.finalize()
            a.value_quantizer.disable_fake_quant()
        for x in CALIB:
            quantized = model(x).logits
            for a in attns:
                a.key_quantizer.disable_fake_quant()
            exact = model(x).logits
            for a in attns:
                a.key_quantizer.enable_fake_quant()
            error += float(((quantized - exact) ** 2).mean())
    return error


@pytest.mark.parametrize(("spec", "q_factor", "k_factor"), [(FP8_PER_TENSOR_SPEC, 8.0, 8.0),
                                                            (INT8_PER_TENSOR_SPEC, 1.0, 30.0)],
                         ids=["fp8-shared-qk-outlier", "int8-key-outlier"])
def test_r3_lowers_the_post_rope_key_cache_error(spec, q_factor, k_factor):
    model = outlier_llama(q_factor, k_factor)
    with_r3 = rotated(model, QuaRotConfig(kv_cache_quant=True))
    without_r3 = rotated(model, QuaRotConfig(kv_cache_quant=False))
    assert getattr(without_r3.model.layers[0].self_attn, "qk_rotation", None) is None
    err_r3, err_plain = key_cache_error(with_r3, spec), key_cache_error(without_r3, spec)
    assert err_r3 < 0.5 * err_plain, (err_r3, err_plain)  # measured: ~5x (fp8), ~10x (int8) lower


def test_qk_rotation_leaves_attention_unchanged():
    attn = tiny_model("llama").model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, HEAD_DIM, generator=gen)
    k, v = torch.randn(1, 2, 5, HEAD_DIM, generator=gen), torch.randn(1, 2, 5, HEAD_DIM, generator=gen)
    plain, _ = quantized_attention_forward(attn, q, k, v, None)
    h = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    for _ in range(3):
        h = torch.kron(torch.tensor([[1, 1], [1, -1]], dtype=torch.int8), h)
    attn.register_buffer("qk_rotation", h)
    turned, _ = quantized_attention_forward(attn, q, k, v, None)
    assert torch.allclose(turned, plain, atol=1e-5)
    attn.register_buffer("qk_rotation", h[:8, :8].contiguous())
    with pytest.raises(ValueError, match="head size"):
        quantized_attention_forward(attn, q, k, v, None)


def _fp8_kv_config(post_rope: bool) -> Config:
    config = LLMTemplate.get("llama").get_config(scheme="fp8", kv_cache_scheme="fp8")
    config.kv_cache_post_rope = post_rope
    config.pre_quant_opt_config = [QuaRotConfig()]
    return config


def test_quarot_defaults_end_to_end_export_and_reload(tmp_path):
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    config = _fp8_kv_config(post_rope=True)
    ModelQuantizer(config).quantize_model(model, CALIB)
    x = token_batches(1, 8, seed=5)[0]
    with torch.no_grad():
        out, ref = model(x).logits, reference(x).logits
    assert torch.isfinite(out).all()
    assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())  # fp8 noise, not another model
    ModelQuantizer.freeze(model)
    folder = ModelExporter(export_dir=tmp_path / "export").export_safetensors_model(model, config)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("model.layers.1.self_attn.qk_rotation")
        assert torch.equal(stored, model.model.layers[1].self_attn.qk_rotation)
        assert stored.dtype == torch.int8 and stored.shape == (HEAD_DIM, HEAD_DIM)
        assert "model.layers.0.self_attn.key_quantizer.scale" in set(f.keys())
    reloaded = ModelImporter(folder).load_model()
    assert torch.equal(reloaded.model.layers[0].self_attn.qk_rotation, model.model.layers[0].self_attn.qk_rotation)
    assert torch.equal(reloaded.model.layers[0].self_attn.key_quantizer.scale,
                       model.model.layers[0].self_attn.key_quantizer.scale)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_pre_rope_kv_quantization_warns_that_r3_cannot_help(caplog):
    model = tiny_model("llama")
    with caplog.at_level(logging.WARNING):
        ModelQuantizer(_fp8_kv_config(post_rope=False)).quantize_model(model, CALIB[:2])
    assert any("before RoPE, where R3 does not act" in r.getMessage() for r in caplog.records)
    assert model.model.layers[0].self_attn.qk_rotation.shape == (HEAD_DIM, HEAD_DIM)
