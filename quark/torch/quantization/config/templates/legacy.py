"""Dense families with their own block layouts: OPT, GPT-J, Phi-2, ChatGLM3, Qwen (v1).

OPT, GPT-J and Phi are verified against tiny random ``transformers`` 5 models. ChatGLM3 and
Qwen v1 are remote-code models (``trust_remote_code``): their names come from the published
``modeling_chatglm.py`` / ``modeling_qwen.py`` and are not verified here.
"""

from __future__ import annotations

from typing import Any

_SCALING_ALGORITHMS = ["awq", "smoothquant", "autosmoothquant", "gptq"]

FAMILIES: list[dict[str, Any]] = [
    {
        # OPT: pre-norm blocks, ReLU MLP (fc1 -> relu -> fc2, so fc1 -> fc2 scaling is exact).
        "model_type": "opt",
        "hf_architecture": "OPTForCausalLM",
        "decoder_layers": "model.decoder.layers",
        "embedding_layers": ["model.decoder.embed_tokens", "model.decoder.embed_positions"],
        "kv_layers": ["*k_proj", "*v_proj"],
        "q_layers": ["*q_proj"],
        "exclude": ["lm_head"],
        "scaling_layers": [
            {
                "prev_op": "self_attn_layer_norm",
                "layers": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                "inp": "self_attn.q_proj",
                "module2inspect": "self_attn",
            },
            {"prev_op": "self_attn.v_proj", "layers": ["self_attn.out_proj"], "inp": "self_attn.out_proj"},
            {"prev_op": "final_layer_norm", "layers": ["fc1"], "inp": "fc1"},
            {"prev_op": "fc1", "layers": ["fc2"], "inp": "fc2"},
        ],
        "gptq_modules": [
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.q_proj",
            "self_attn.out_proj",
            "fc1",
            "fc2",
        ],
        "algorithms": _SCALING_ALGORITHMS,
    },
    {
        # GPT-J: attention and MLP run in parallel off ln_1; the MLP is fc_in -> gelu -> fc_out.
        "model_type": "gptj",
        "hf_architecture": "GPTJForCausalLM",
        "decoder_layers": "transformer.h",
        "embedding_layers": ["transformer.wte"],
        "kv_layers": ["*k_proj", "*v_proj"],
        "q_layers": ["*q_proj"],
        "exclude": ["lm_head"],
        "scaling_layers": [
            {
                "prev_op": "ln_1",
                "layers": ["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in"],
                "inp": "attn.q_proj",
            },
            {"prev_op": "attn.v_proj", "layers": ["attn.out_proj"], "inp": "attn.out_proj"},
        ],
        "gptq_modules": [
            "attn.k_proj",
            "attn.v_proj",
            "attn.q_proj",
            "mlp.fc_in",
            "attn.out_proj",
            "mlp.fc_out",
        ],
        "algorithms": _SCALING_ALGORITHMS,
    },
    {
        # Phi-2: like GPT-J, attention (q, k, v -> dense) and MLP (fc1 -> gelu -> fc2) share
        # input_layernorm.
        "model_type": "phi",
        "hf_architecture": "PhiForCausalLM",
        "decoder_layers": "model.layers",
        "embedding_layers": ["model.embed_tokens"],
        "kv_layers": ["*k_proj", "*v_proj"],
        "q_layers": ["*q_proj"],
        "exclude": ["lm_head"],
        "scaling_layers": [
            {
                "prev_op": "input_layernorm",
                "layers": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"],
                "inp": "self_attn.q_proj",
            },
            {"prev_op": "self_attn.v_proj", "layers": ["self_attn.dense"], "inp": "self_attn.dense"},
        ],
        "gptq_modules": [
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.q_proj",
            "self_attn.dense",
            "mlp.fc1",
            "mlp.fc2",
        ],
        "algorithms": _SCALING_ALGORITHMS,
    },
    {
        # ChatGLM3 (remote code): fused query_key_value; dense_h_to_4h holds gate and up of a
        # SwiGLU, so dense_h_to_4h -> dense_4h_to_h is not a scaling group.
        "model_type": "chatglm",
        "hf_architecture": None,
        "decoder_layers": "transformer.encoder.layers",
        "embedding_layers": ["transformer.embedding.word_embeddings"],
        "kv_layers": ["*query_key_value"],
        "q_layers": ["*query_key_value"],
        "exclude": ["transformer.output_layer"],
        "scaling_layers": [
            {
                "prev_op": "input_layernorm",
                "layers": ["self_attention.query_key_value"],
                "inp": "self_attention.query_key_value",
                "module2inspect": "self_attention",
            },
            {
                "prev_op": "post_attention_layernorm",
                "layers": ["mlp.dense_h_to_4h"],
                "inp": "mlp.dense_h_to_4h",
                "module2inspect": "mlp",
            },
        ],
        "gptq_modules": [
            "self_attention.query_key_value",
            "self_attention.dense",
            "mlp.dense_h_to_4h",
            "mlp.dense_4h_to_h",
        ],
        "algorithms": _SCALING_ALGORITHMS,
    },
    {
        # Qwen v1 (remote code): fused attn.c_attn; the MLP computes c_proj(w1(x) * silu(w2(x))),
        # so w1 (the un-activated branch) may pass a scale on to c_proj.
        "model_type": "qwen",
        "hf_architecture": None,
        "decoder_layers": "transformer.h",
        "embedding_layers": ["transformer.wte"],
        "kv_layers": ["*c_attn"],
        "q_layers": ["*c_attn"],
        "exclude": ["lm_head"],
        "scaling_layers": [
            {"prev_op": "ln_1", "layers": ["attn.c_attn"], "inp": "attn.c_attn", "module2inspect": "attn"},
            {"prev_op": "ln_2", "layers": ["mlp.w2", "mlp.w1"], "inp": "mlp.w2", "module2inspect": "mlp"},
            {"prev_op": "mlp.w1", "layers": ["mlp.c_proj"], "inp": "mlp.c_proj"},
        ],
        "gptq_modules": ["attn.c_attn", "attn.c_proj", "mlp.w2", "mlp.w1", "mlp.c_proj"],
        "algorithms": _SCALING_ALGORITHMS,
    },
]
