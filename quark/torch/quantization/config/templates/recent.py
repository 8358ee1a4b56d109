"""Families newer than the seeds' template table: Gemma 2 and 3, Qwen3 and Qwen3-MoE, OLMo 2, GPT-OSS, Llama 4.

Registered so that ``LLMTemplate.get(model.config.model_type)`` works for them as it does in the reference: the
names of their key/value and query projections and their default exclusions (the language model's ``lm_head``,
mixture-of-experts routers, vision towers and projectors). They carry no algorithm data: AWQ, SmoothQuant,
AutoSmoothQuant, GPTQ and rotation find the scaling groups from the model when they run
(``template.discover_at_run_time``), which handles what sets these families apart: Gemma's norms multiply by
``1 + weight``, Qwen3, Gemma 3 and OLMo 2 normalise q and k per head, Gemma 2/3 and OLMo 2 normalise after
attention and the MLP (rotation refuses those post-norm blocks by name), and the experts of Qwen3-MoE, GPT-OSS and
Llama 4 are fused 3-D parameters that ``moe_experts.unfuse_experts`` turns into Linears
(``tests/llm/test_generic_families.py`` runs each algorithm on tiny random models of every family here).
"""

from __future__ import annotations

from typing import Any

_QKV = {"kv_layers": ["*k_proj", "*v_proj"], "q_layers": ["*q_proj"]}
_TEXT = {"decoder_layers": "model.layers", "embedding_layers": ["model.embed_tokens"], **_QKV}

FAMILIES: list[dict[str, Any]] = [
    {"model_type": "gemma2", "hf_architecture": "Gemma2ForCausalLM", **_TEXT, "exclude": ["lm_head"],
     "algorithms": []},
    {"model_type": "gemma3_text", "hf_architecture": "Gemma3ForCausalLM", **_TEXT, "exclude": ["*lm_head"],
     "algorithms": []},
    {
        # Gemma 3 4B and up: a SigLIP vision tower and a projector stay float; the language model is quantized
        "model_type": "gemma3",
        "hf_architecture": "Gemma3ForConditionalGeneration",
        "decoder_layers": "model.language_model.layers",
        "embedding_layers": ["model.language_model.embed_tokens"],
        "kv_layers": ["*language_model.*k_proj", "*language_model.*v_proj"],
        "q_layers": ["*language_model.*q_proj"],
        "exclude": ["*lm_head", "*vision_tower*", "*multi_modal_projector*"],
        "algorithms": [],
    },
    {"model_type": "qwen3", "hf_architecture": "Qwen3ForCausalLM", **_TEXT, "exclude": ["lm_head"],
     "algorithms": []},
    {"model_type": "qwen3_moe", "hf_architecture": "Qwen3MoeForCausalLM", **_TEXT, "exclude": ["lm_head", "*.gate"],
     "algorithms": []},
    {"model_type": "olmo2", "hf_architecture": "Olmo2ForCausalLM", **_TEXT, "exclude": ["lm_head"],
     "algorithms": []},
    {"model_type": "gpt_oss", "hf_architecture": "GptOssForCausalLM", **_TEXT, "exclude": ["lm_head", "*router*"],
     "algorithms": []},
    {
        # Llama 4 Scout / Maverick: a vision model and a projector stay float, so do the experts' routers
        "model_type": "llama4",
        "hf_architecture": "Llama4ForConditionalGeneration",
        "decoder_layers": "language_model.model.layers",
        "embedding_layers": ["language_model.model.embed_tokens"],
        "kv_layers": ["*language_model.*.k_proj", "*language_model.*.v_proj"],
        "q_layers": ["*language_model.*.q_proj"],
        "exclude": ["*lm_head", "multi_modal_projector*", "*feed_forward.router", "vision_model*"],
        "algorithms": [],
    },
]
