"""Every family of the seeds' supported-model table quantized (fp8 W8A8 + fp8 KV cache) on a tiny
random model built from its ``transformers`` config, through the command line's config builder.

Families whose code is not in ``transformers`` (remote code) run on their closest architecture;
``CLOSEST`` records which, and the family table of docs/results.md states the gap.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase

import pytest
import torch
import transformers
from torch import nn

from quark.torch import ModelQuantizer
from quark.torch.llm import moe, schemes
from quark.torch.llm.model_loading import model_class
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear

D = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, max_position_embeddings=128)
GQA = dict(D, num_key_value_heads=2, intermediate_size=128)


def _mllama() -> transformers.PretrainedConfig:
    text = dict(GQA, cross_attention_layers=[1], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=28, patch_size=14, vision_output_dim=64, intermediate_layers_indices=[0])
    return transformers.MllamaConfig(text_config=text, vision_config=vision)


MOE = dict(GQA, num_experts_per_tok=2)
FAMILIES: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": lambda: transformers.LlamaConfig(**GQA),
    "mllama": _mllama,
    "opt": lambda: transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                          vocab_size=256, max_position_embeddings=128, word_embed_proj_dim=64),
    "gptj": lambda: transformers.GPTJConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128,
                                            rotary_dim=8),
    "chatglm": lambda: transformers.GlmConfig(**GQA, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "qwen": lambda: transformers.Qwen2Config(**GQA),
    "qwen2": lambda: transformers.Qwen2Config(**GQA),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**MOE, moe_intermediate_size=64,
                                                     shared_expert_intermediate_size=128, num_experts=4),
    "phi": lambda: transformers.PhiConfig(**GQA),
    "phi3": lambda: transformers.Phi3Config(**GQA, pad_token_id=0),
    "mistral": lambda: transformers.MistralConfig(**GQA),
    "mixtral": lambda: transformers.MixtralConfig(**MOE, num_local_experts=4),
    "grok-1": lambda: transformers.MixtralConfig(**MOE, num_local_experts=8),
    "cohere": lambda: transformers.CohereConfig(**GQA),
    "dbrx": lambda: transformers.DbrxConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=128,
                                            ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2},
                                            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}),
    "deepseek": lambda: transformers.Qwen2MoeConfig(**MOE, moe_intermediate_size=64,
                                                    shared_expert_intermediate_size=128, num_experts=4),
}
# seed family -> architecture it is tested on, where they differ (remote-code families)
CLOSEST = {"chatglm": "glm", "qwen": "qwen2", "grok-1": "mixtral", "deepseek": "qwen2_moe"}


def load_class(config: transformers.PretrainedConfig) -> nn.Module:
    return model_class(config.model_type).from_config(config)


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_fp8_with_kv_cache(family: str) -> None:
    torch.manual_seed(0)
    model = load_class(FAMILIES[family]()).eval()
    model_type = schemes.LLMTemplate.get_model_type(model)
    assert model_type == CLOSEST.get(family, family)
    template = schemes.template_for(model_type)
    request = schemes.SchemeRequest("w_fp8_a_fp8", kv_cache_dtype="fp8",
                                    extra_exclude=schemes.text_only_excludes(model.config))
    config = schemes.build_config(template, request)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    unfused = moe.unfuse_experts(model)
    fused_left, unknown = moe.fused_expert_modules(model)
    assert not fused_left
    if family in ("mixtral", "qwen2_moe", "grok-1", "deepseek", "dbrx"):
        assert len(unfused) == 2 and not unknown
    if family == "dbrx":
        assert len(unfused) == 2 and not unknown

    expected = [n for n in linear_names(model) if not any(fnmatchcase(n, p) for p in config.exclude)]
    batches = [torch.randint(0, 256, (1, 16)) for _ in range(2)]
    ModelQuantizer(config).quantize_model(model, batches)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(quantized) == sorted(expected) and quantized
    kv = [n for n in quantized if any(fnmatchcase(n, p) for p in template.kv_layer_name or [])]
    assert kv, "the template's kv patterns match no layer of the model"
    for name in kv:
        assert quantized[name].output_quantizer is not None, name
    if family == "mllama":  # language part only; cross-attention layer 1 needs images to calibrate
        assert not any("vision_model" in n or "layers.1." in n for n in quantized)
        assert any("language_model.layers.0." in n for n in quantized)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.99, cosine
