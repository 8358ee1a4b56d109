"""Tiny random decoder-only models built from transformers configs (no network)."""

from __future__ import annotations

import torch
import transformers

FAMILIES = ("llama", "opt", "qwen2", "mistral", "phi3")

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64)


def make_config(family: str) -> transformers.PretrainedConfig:
    if family == "llama":
        return transformers.LlamaConfig(**_COMMON, intermediate_size=128, num_key_value_heads=2)
    if family == "mistral":
        return transformers.MistralConfig(**_COMMON, intermediate_size=128, num_key_value_heads=2)
    if family == "qwen2":
        return transformers.Qwen2Config(**_COMMON, intermediate_size=128, num_key_value_heads=2)
    if family == "phi3":
        return transformers.Phi3Config(**_COMMON, intermediate_size=128, num_key_value_heads=4,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "opt":
        return transformers.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, ffn_dim=128, max_position_embeddings=64,
                                      word_embed_proj_dim=64, pad_token_id=1)
    raise ValueError(family)


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = make_config(family)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.eval()
    # Random init gives tiny norms and weights; make norm weights non-trivial so that folding and
    # scaling are actually exercised, and give activations some outlier channels.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand_like(p) + 0.5)
            elif p.dim() == 1 and "norm" in name and name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
            elif p.dim() == 2:
                p.copy_(torch.randn_like(p) * 0.08)
        emb = model.get_input_embeddings().weight
        emb[:, :4] *= 8.0
    return model


def make_batches(n: int = 4, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128, (1, seq), generator=gen) for _ in range(n)]
