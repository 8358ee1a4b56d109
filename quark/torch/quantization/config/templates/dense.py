"""Dense decoder families with the Llama block layout (and its fused / parallel variants).

Names verified against tiny random ``transformers`` 5 models (see ``hf_architecture``).
"""

from __future__ import annotations

from typing import Any

# The Llama block: input_layernorm -> self_attn(q, k, v, o); post_attention_layernorm -> mlp
# (gate, up -> down). Llama 2/3/3.1/3.2, Qwen1.5/Qwen2 and Mistral share it.
LLAMA_SCALING_LAYERS: list[dict[str, Any]] = [
    {
        "prev_op": "input_layernorm",
        "layers": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "inp": "self_attn.q_proj",
        "module2inspect": "self_attn",
    },
    {"prev_op": "self_attn.v_proj", "layers": ["self_attn.o_proj"], "inp": "self_attn.o_proj"},
    {
        "prev_op": "post_attention_layernorm",
        "layers": ["mlp.gate_proj", "mlp.up_proj"],
        "inp": "mlp.gate_proj",
        "module2inspect": "mlp",
    },
    {"prev_op": "mlp.up_proj", "layers": ["mlp.down_proj"], "inp": "mlp.down_proj"},
]

LLAMA_GPTQ_MODULES: list[str] = [
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.q_proj",
    "self_attn.o_proj",
    "mlp.up_proj",
    "mlp.gate_proj",
    "mlp.down_proj",
]

# Rotation (R1) is fused into every norm -> Linear group of a block; the final norm and the
# lm_head are found from the model by the algorithm.
LLAMA_ROTATION_LAYERS: list[dict[str, Any]] = [LLAMA_SCALING_LAYERS[0], LLAMA_SCALING_LAYERS[2]]

_SCALING_ALGORITHMS = ["awq", "smoothquant", "autosmoothquant", "gptq"]

FAMILIES: list[dict[str, Any]] = [
    {
        "model_type": "llama",
        "hf_architecture": "LlamaForCausalLM",
        "decoder_layers": "model.layers",
        "embedding_layers": ["model.embed_tokens"],
        "kv_layers": ["*k_proj", "*v_proj"],
        "q_layers": ["*q_proj"],
        "exclude": ["lm_head"],
        "scaling_layers": LLAMA_SCALING_LAYERS,
        "gptq_modules": LLAMA_GPTQ_MODULES,
        "rotation_layers": LLAMA_ROTATION_LAYERS,
        "algorithms": [*_SCALING_ALGORITHMS, "rotation"],
    },
    {
        # Llama-3.2-Vision: only the language model is quantized; the cross-attention blocks
        # (every few layers) have cross_attn instead of self_attn, so the Llama scaling groups
        # do not hold for every block and no algorithm data is given (FP8/INT only).
        "model_type": "mllama",
        "hf_architecture": "MllamaForConditionalGeneration",
        "decoder_layers": "model.language_model.layers",
        "embedding_layers": ["model.language_model.embed_tokens"],
        "kv_layers": ["*language_model.*k_proj", "*language_model.*v_proj"],
        "q_layers": ["*language_model.*q_proj"],
        "exclude": ["lm_head", "*vision_model*", "*multi_modal_projector*"],
        "algorithms": [],
    },
    {
        # Qwen1.5 and Qwen2 checkpoints both report model_type "qwen2".
        "model_type": "qwen2",
        "hf_architecture": "Qwen2ForCausalLM",
        "decoder_layers": "model.layers",
        "embedding_layers": ["model.embed_tokens"],
        "kv_layers": ["*k_proj", "*v_proj"],
        "q_layers": ["*q_proj"],
        "exclude": ["lm_head"],
        "scaling_layers": LLAMA_SCALING_LAYERS,
        "gptq_modules": LLAMA_GPTQ_MODULES,
        "algorithms": _SCALING_ALGORITHMS,
    },
    {
        "model_type": "mistral",
        "hf_architecture": "MistralForCausalLM",
        "decoder_layers": "model.layers",
        "embedding_layers": ["model.embed_tokens"],
        "kv_layers": ["*k_proj", "*v_proj"],
        "q_layers": ["*q_proj"],
        "exclude": ["lm_head"],
        "scaling_layers": LLAMA_SCALING_LAYERS,
        "gptq_modules": LLAMA_GPTQ_MODULES,
        "algorithms": _SCALING_ALGORITHMS,
    },
    {
        # Phi-3 / Phi-3.5: fused qkv_proj and gate_up_proj (up is the second half).
        "model_type": "phi3",
        "hf_architecture": "Phi3ForCausalLM",
        "decoder_layers": "model.layers",
        "embedding_layers": ["model.embed_tokens"],
        "kv_layers": ["*qkv_proj"],
        "q_layers": ["*qkv_proj"],
        "exclude": ["lm_head"],
        "scaling_layers": [
            {
                "prev_op": "input_layernorm",
                "layers": ["self_attn.qkv_proj"],
                "inp": "self_attn.qkv_proj",
                "module2inspect": "self_attn",
            },
            {"prev_op": "self_attn.qkv_proj", "layers": ["self_attn.o_proj"], "inp": "self_attn.o_proj"},
            {
                "prev_op": "post_attention_layernorm",
                "layers": ["mlp.gate_up_proj"],
                "inp": "mlp.gate_up_proj",
                "module2inspect": "mlp",
            },
            {"prev_op": "mlp.gate_up_proj", "layers": ["mlp.down_proj"], "inp": "mlp.down_proj"},
        ],
        "gptq_modules": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
        "algorithms": _SCALING_ALGORITHMS,
    },
    {
        # Command-R: attention and MLP run in parallel off one input_layernorm.
        "model_type": "cohere",
        "hf_architecture": "CohereForCausalLM",
        "decoder_layers": "model.layers",
        "embedding_layers": ["model.embed_tokens"],
        "kv_layers": ["*k_proj", "*v_proj"],
        "q_layers": ["*q_proj"],
        "exclude": ["lm_head"],
        "scaling_layers": [
            {
                "prev_op": "input_layernorm",
                "layers": [
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                ],
                "inp": "self_attn.q_proj",
            },
            {"prev_op": "self_attn.v_proj", "layers": ["self_attn.o_proj"], "inp": "self_attn.o_proj"},
            {"prev_op": "mlp.up_proj", "layers": ["mlp.down_proj"], "inp": "mlp.down_proj"},
        ],
        "gptq_modules": LLAMA_GPTQ_MODULES,
        "algorithms": _SCALING_ALGORITHMS,
    },
]
