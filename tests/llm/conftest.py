"""Tiny random model folders for the LLM command-line tests (saved once per session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers

from quark.torch.llm.model_loading import EMBEDDED_CALIBRATION_TEXT, EMBEDDED_MODEL_DIR

VOCAB = 512  # the stories260K sentencepiece vocabulary, reused as these models' tokenizer


def save_tiny(config: transformers.PretrainedConfig, folder: Path, seed: int = 0) -> Path:
    """Save a random model of ``config`` with the stories260K tokenizer into ``folder``."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    shutil.copy(EMBEDDED_MODEL_DIR / "tokenizer.model", folder / "tokenizer.model")
    return folder


def tiny_llama_config() -> transformers.LlamaConfig:
    # widths are multiples of 128, so every group/block size of the recipes divides them
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def tiny_mixtral_config() -> transformers.MixtralConfig:
    return transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=1,
                                      eos_token_id=2)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tiny_llama_config(), tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tiny_mixtral_config(), tmp_path_factory.mktemp("tiny_mixtral"))


@pytest.fixture(scope="session")
def calib_text() -> Path:
    return EMBEDDED_CALIBRATION_TEXT
