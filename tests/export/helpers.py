"""Quantized, frozen tiny models for the export tests (built once per scheme and cached)."""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from quark.torch import LLMTemplate, ModelQuantizer
from quark.torch.quantization.config.config import Config
from tests.helpers.tiny_models import tiny_model, token_batches

INPUT = token_batches(1, 8, seed=5)[0]


@functools.cache
def _frozen(scheme: str, kv: bool, family: str, pack_method: str) -> tuple[nn.Module, Config]:
    model = tiny_model(family)
    config = LLMTemplate.get(family).get_config(scheme=scheme, kv_cache_scheme="fp8" if kv else None)
    ModelQuantizer(config).quantize_model(model, token_batches(2, 8))
    ModelQuantizer.freeze(model, pack_method=pack_method)
    return model, config


def frozen_model(scheme: str, kv: bool = False, family: str = "llama",
                 pack_method: str = "reorder") -> tuple[nn.Module, Config]:
    """A fresh copy of a quantized + frozen tiny model and its config."""
    model, config = _frozen(scheme, kv, family, pack_method)
    return copy.deepcopy(model), config


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(INPUT).logits
