"""Attention quantization (softmax output, post-RoPE K/V) on transformers models."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from quark.torch import LLMTemplate, ModelQuantizer
from quark.torch.quantization.nn.modules.quantize_attention import (
    ATTN_IMPLEMENTATION,
    attach_attention_quantizers,
    find_attention_modules,
)
from tests.helpers.tiny_models import tiny_model, token_batches

FAMILIES = ["llama", "opt", "qwen2"]


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(b).logits for b in batches])


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_attention_without_quantizers_matches_transformers(family):
    """Our eager attention, with every quantizer disabled, reproduces the model's own attention."""
    model = tiny_model(family)
    batches = token_batches(2)
    ref = logits(model, batches)
    config = LLMTemplate.get(model.config.model_type).get_config(scheme="fp8", attention_scheme="fp8")
    patch = attach_attention_quantizers(model, config)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    for _, attn in find_attention_modules(model):
        attn.softmax_quantizer.disable_observer()
        attn.softmax_quantizer.disable_fake_quant()
    torch.testing.assert_close(logits(model, batches), ref, rtol=1e-4, atol=1e-4)
    patch.undo()
    assert model.config._attn_implementation != ATTN_IMPLEMENTATION


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_attention_scheme_end_to_end(family):
    model = tiny_model(family)
    batches = token_batches(2)
    ref = logits(model, batches)
    config = LLMTemplate.get(model.config.model_type).get_config(scheme="fp8", kv_cache_scheme="fp8",
                                                                  attention_scheme="fp8")
    ModelQuantizer(config).quantize_model(model, batches)
    modules = find_attention_modules(model)
    assert len(modules) == 2
    for _, attn in modules:
        scale = attn.softmax_quantizer.scale.item()
        assert 0 < scale <= 1.0 / 448 + 1e-9  # probabilities are in [0, 1]
    out = logits(model, batches)
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.1
    ModelQuantizer.freeze(model)
    torch.testing.assert_close(logits(model, batches), out, rtol=1e-4, atol=1e-4)


def test_post_rope_kv_quantizers():
    model = tiny_model("llama")
    config = LLMTemplate.get("llama").get_config(scheme="fp8", kv_cache_scheme="fp8")
    config = replace(config, kv_cache_post_rope=True)
    ModelQuantizer(config).quantize_model(model, token_batches(2))
    attn = model.model.layers[0].self_attn
    assert attn.key_quantizer.scale.item() > 0 and attn.value_quantizer.scale.item() > 0
    assert torch.isfinite(model(token_batches(1)[0]).logits).all()
    # post-RoPE replaces the k/v projection-output quantization, it does not add to it
    assert attn.k_proj.output_quantizer is None and attn.v_proj.output_quantizer is None
    assert attn.q_proj.input_quantizer is not None and attn.k_proj.weight_quantizer is not None


def test_pre_rope_kv_quantizes_projection_outputs_only():
    model = tiny_model("llama")
    config = LLMTemplate.get("llama").get_config(scheme="fp8", kv_cache_scheme="fp8")
    ModelQuantizer(config).quantize_model(model, token_batches(2))
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.output_quantizer is not None and attn.v_proj.output_quantizer is not None
    assert not hasattr(attn, "key_quantizer") or attn.key_quantizer is None


def test_failed_run_removes_attention_quantizers():
    model = tiny_model("llama")
    config = LLMTemplate.get("llama").get_config(scheme="fp8", attention_scheme="fp8")
    model.model.layers[1].mlp.act_fn.register_forward_hook(lambda m, a, out: out * float("inf"))
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match="Inf"):
        ModelQuantizer(config).quantize_model(model, token_batches(1))
    assert model.config._attn_implementation == before
    assert not hasattr(model.model.layers[0].self_attn, "softmax_quantizer")


class _EagerOnlyAttention:
    """Stands in for transformers' attention registry: every model computes attention itself."""

    @staticmethod
    def get_interface(name, default):
        return default


def test_post_rope_kv_on_attention_outside_the_interface_says_so(monkeypatch):
    """A model that computes attention itself (not through transformers' attention interface, as
    GPT-J did before transformers 5.25) never feeds the post-RoPE quantizers: the error says why."""
    from transformers.models.llama import modeling_llama

    from quark.torch.llm import schemes

    monkeypatch.setattr(modeling_llama, "ALL_ATTENTION_FUNCTIONS", _EagerOnlyAttention())
    model = tiny_model("llama")
    config = schemes.build_config(schemes.template_for("llama"), schemes.SchemeRequest(
        "w_fp8_a_fp8", kv_cache_dtype="fp8", kv_cache_post_rope=True))
    with pytest.raises(RuntimeError, match="attention interface"):
        ModelQuantizer(config).quantize_model(model, token_batches(2))
