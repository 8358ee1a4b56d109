"""Quantized, frozen tiny models for the export tests (built once per scheme and cached)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn

from quark.torch import LLMTemplate, ModelExporter, ModelQuantizer
from quark.torch.export.config.config import ExporterConfig, JsonExporterConfig
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


def quantize_and_export(model: nn.Module, config: Config, batches: list[torch.Tensor], folder: Path) -> torch.Tensor:
    """Quantize and freeze ``model`` with ``config`` on ``batches``, export it in the quark hf_format
    layout to ``folder``; return its logits on ``batches[0]`` (what a reload must reproduce)."""
    quantizer = ModelQuantizer(config)
    quantizer.quantize_model(model, batches)
    quantizer.freeze(model)
    with torch.no_grad():
        ref = model(batches[0]).logits
    ModelExporter(ExporterConfig(json_export_config=JsonExporterConfig()), str(folder)).export_safetensors_model(
        model, config)
    return ref
