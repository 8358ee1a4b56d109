"""Mixture-of-experts families: Qwen1.5-MoE, Mixtral, Grok-1, DBRX, DeepSeek-MoE.

In ``transformers`` 5 the experts of Qwen2-MoE, Mixtral and DBRX are one fused module holding
3-D parameters (``mlp.experts.gate_up_proj``), not Linears, and the routers are not Linears
either; the scaling groups and GPTQ lists below therefore cover attention (and the shared
expert), which are Linears. The router exclusions are kept for checkpoints loaded with older
layouts, where routers are Linears. Grok-1 and DeepSeek-MoE (v1) are remote-code models: their
names come from the published ``modeling_grok1.py`` / ``modeling_deepseek.py`` and are not
verified here.
"""

from __future__ import annotations

from typing import Any

from quark.torch.quantization.config.templates.dense import LLAMA_SCALING_LAYERS

_ATTENTION_SCALING_LAYERS = LLAMA_SCALING_LAYERS[:2]
_ATTENTION_GPTQ_MODULES = ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.o_proj"]
_SCALING_ALGORITHMS = ["awq", "smoothquant", "autosmoothquant", "gptq"]

_GROK_EXPERTS = range(8)

FAMILIES: list[dict[str, Any]] = [
    {
        # Qwen1.5-MoE-A2.7B: routed experts + a shared expert gated by shared_expert_gate (out 1).
        "model_type": "qwen2_moe",
        "hf_architecture": "Qwen2MoeForCausalLM",
        "decoder_layers": "model.layers",
        "embedding_layers": ["model.embed_tokens"],
        "kv_layers": ["*k_proj", "*v_proj"],
        "q_layers": ["*q_proj"],
        "exclude": ["lm_head", "*.gate", "*.shared_expert_gate"],
        "scaling_layers": [
            *_ATTENTION_SCALING_LAYERS,
            {
                "prev_op": "mlp.shared_expert.up_proj",
                "layers": ["mlp.shared_expert.down_proj"],
                "inp": "mlp.shared_expert.down_proj",
            },
        ],
        "gptq_modules": [
            *_ATTENTION_GPTQ_MODULES,
            "mlp.shared_expert.up_proj",
            "mlp.shared_expert.gate_proj",
            "mlp.shared_expert.down_proj",
        ],
        "algorithms": _SCALING_ALGORITHMS,
    },
    {
        "model_type": "mixtral",
        "hf_architecture": "MixtralForCausalLM",
        "decoder_layers": "model.layers",
        "embedding_layers": ["model.embed_tokens"],
        "kv_layers": ["*k_proj", "*v_proj"],
        "q_layers": ["*q_proj"],
        "exclude": ["lm_head", "*.gate", "*block_sparse_moe.gate"],
        "scaling_layers": _ATTENTION_SCALING_LAYERS,
        "gptq_modules": _ATTENTION_GPTQ_MODULES,
        "algorithms": _SCALING_ALGORITHMS,
    },
    {
        # Grok-1 (remote code): expert MLP is linear_1(gelu(linear(x)) * linear_v(x)); the
        # pre_moe_norm feeds the router and all 8 experts, so all of them share one group.
        "model_type": "grok-1",
        "hf_architecture": None,
        "decoder_layers": "model.layers",
        "embedding_layers": ["model.embed_tokens"],
        "kv_layers": ["*k_proj", "*v_proj"],
        "q_layers": ["*q_proj"],
        "exclude": ["lm_head", "*.gate"],
        "scaling_layers": [
            {
                "prev_op": "pre_attn_norm",
                "layers": ["attn.q_proj", "attn.k_proj", "attn.v_proj"],
                "inp": "attn.q_proj",
                "module2inspect": "attn",
            },
            {"prev_op": "attn.v_proj", "layers": ["attn.o_proj"], "inp": "attn.o_proj"},
            {
                "prev_op": "pre_moe_norm",
                "layers": [
                    "moe_block.gate",
                    *[
                        f"moe_block.experts.{i}.{name}"
                        for i in _GROK_EXPERTS
                        for name in ("linear", "linear_v")
                    ],
                ],
                "inp": "moe_block.experts.0.linear",
                "module2inspect": "moe_block",
            },
            *[
                {
                    "prev_op": f"moe_block.experts.{i}.linear_v",
                    "layers": [f"moe_block.experts.{i}.linear_1"],
                    "inp": f"moe_block.experts.{i}.linear_1",
                }
                for i in _GROK_EXPERTS
            ],
        ],
        "gptq_modules": [
            "attn.k_proj",
            "attn.v_proj",
            "attn.q_proj",
            "attn.o_proj",
            *[
                f"moe_block.experts.{i}.{name}"
                for name in ("linear", "linear_v", "linear_1")
                for i in _GROK_EXPERTS
            ],
        ],
        "algorithms": ["awq", "smoothquant", "gptq"],
    },
    {
        # DBRX: fused Wqkv inside norm_attn_norm; router Linear at ffn.router.layer (FP8 only).
        "model_type": "dbrx",
        "hf_architecture": "DbrxForCausalLM",
        "decoder_layers": "transformer.blocks",
        "embedding_layers": ["transformer.wte"],
        "kv_layers": ["*Wqkv"],
        "q_layers": ["*Wqkv"],
        "exclude": ["lm_head", "*router.layer"],
        "algorithms": [],
    },
    {
        # DeepSeek-MoE 16B (v1, remote code): Llama attention, DeepseekMoE with gate (MoEGate),
        # experts.N and shared_experts; the first block has a dense mlp (FP8 only).
        "model_type": "deepseek",
        "hf_architecture": None,
        "decoder_layers": "model.layers",
        "embedding_layers": ["model.embed_tokens"],
        "kv_layers": ["*k_proj", "*v_proj"],
        "q_layers": ["*q_proj"],
        "exclude": ["lm_head", "*.gate"],
        "algorithms": [],
    },
]
