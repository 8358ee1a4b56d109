"""Tiny random transformers models built from configs (no network, no weights on disk)."""

from __future__ import annotations

import logging

import torch
import transformers

logging.getLogger("transformers").setLevel(logging.ERROR)

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               vocab_size=128, max_position_embeddings=128)


def tiny_config(family: str) -> transformers.PretrainedConfig:
    """A 2-layer config of ``family`` whose Linear dims are multiples of 32."""
    if family == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **_COMMON)
    if family == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, **_COMMON)
    if family == "mistral":
        return transformers.MistralConfig(num_key_value_heads=2, **_COMMON)
    if family == "phi3":
        return transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, **_COMMON)
    if family == "opt":
        return transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=128, max_position_embeddings=128, word_embed_proj_dim=64)
    raise ValueError(f"unknown tiny family {family!r}")


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family))
    return model.eval()


def token_batches(n: int = 4, seq: int = 16, vocab: int = 128, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seq), generator=gen) for _ in range(n)]
