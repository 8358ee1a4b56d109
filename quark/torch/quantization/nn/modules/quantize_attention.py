"""Attention quantization for transformers models: softmax output and post-RoPE K/V.

transformers (>= 4.48) routes every attention module through ``ALL_ATTENTION_FUNCTIONS`` keyed by
``config._attn_implementation``. We register one more implementation, ``"quark_quantized"``: the
eager attention computation with fake quantizers applied to the post-RoPE keys and values
(``key_quantizer``/``value_quantizer``, when ``Config.kv_cache_post_rope``) and to the softmax
probabilities (``softmax_quantizer``, from ``Config.softmax_quant_spec``). The quantizers are
attributes of each attention module, so they calibrate, save and reload like any other.

QuaRot's online R3: an attention module with a ``qk_rotation`` buffer (int8 ±1 Hadamard ``H`` of
order ``head_dim``, set by ``QuaRotConfig(kv_cache_quant=True)``) has its queries and keys rotated
as ``x @ H / sqrt(head_dim)`` before the key quantizer; ``q·kᵀ`` is unchanged, outliers of the
keys are spread over the head's channels before the K cache is quantized.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quark.torch.quantization.config.config import Config, QuantizationSpec
from quark.torch.quantization.tensor_quantize import FakeQuantize

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "quark_quantized"
ATTENTION_QUANTIZERS = ("key_quantizer", "value_quantizer", "softmax_quantizer")
QK_ROTATION = "qk_rotation"  # QuaRot R3 buffer of an attention module
_registered = False


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    batch, heads, seq, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, seq, dim).reshape(batch, heads * groups, seq, dim)


def rotate_queries_keys(module: nn.Module, query: torch.Tensor,
                        key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the module's ``qk_rotation`` (QuaRot R3) to queries and keys; unchanged without one."""
    rotation = getattr(module, QK_ROTATION, None)
    if rotation is None:
        return query, key
    n = rotation.shape[0]
    if query.shape[-1] != n or key.shape[-1] != n:
        raise ValueError(f"{type(module).__name__}.qk_rotation is {n}x{n}, but queries/keys have head size "
                         f"{query.shape[-1]}/{key.shape[-1]}")
    h = rotation.to(query.device, query.dtype)
    return (query @ h) / math.sqrt(n), (key @ h.to(key.dtype)) / math.sqrt(n)


def quantized_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, scaling: float | None = None,
                                dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention ([batch, heads, seq, dim] inputs) with the module's attention quantizers."""
    query, key = rotate_queries_keys(module, query, key)
    key_q = getattr(module, "key_quantizer", None)
    value_q = getattr(module, "value_quantizer", None)
    softmax_q = getattr(module, "softmax_quantizer", None)
    if key_q is not None:
        key = key_q(key)
    if value_q is not None:
        value = value_q(value)
    groups = query.shape[1] // key.shape[1]
    key = _repeat_kv(key, groups)
    value = _repeat_kv(value, groups)
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., : key.shape[-2]], torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if softmax_q is not None:
        probs = softmax_q(probs)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def register_attention_implementation() -> None:
    """Register ``"quark_quantized"`` with transformers' attention and mask interfaces (once)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, quantized_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
    _registered = True


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention blocks that dispatch through transformers' attention interface."""
    found = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls.endswith("Attention") and hasattr(module, "config") and (
                fnmatch.fnmatch(name, "*self_attn") or fnmatch.fnmatch(name, "*.attn")
                or fnmatch.fnmatch(name, "*.attention")):
            found.append((name, module))
    return found


@dataclass
class AttentionPatch:
    """What :func:`attach_attention_quantizers` changed, so it can be undone."""

    modules: list[nn.Module]
    configs: list[tuple[Any, str | None]]

    def undo(self) -> None:
        for module in self.modules:
            for attr in ATTENTION_QUANTIZERS:
                if hasattr(module, attr):
                    delattr(module, attr)
        for config, previous in self.configs:
            config._attn_implementation = previous


def _kv_output_spec(config: Config) -> QuantizationSpec | None:
    for table in (config.kv_cache_quant_config or {}).values():
        spec = table.output_tensors
        if spec is not None:
            return spec[0] if isinstance(spec, (list, tuple)) else spec
    return None


def attach_attention_quantizers(model: nn.Module, config: Config) -> AttentionPatch | None:
    """Attach softmax / post-RoPE K,V quantizers per ``config``; None when nothing is asked."""
    softmax_spec = config.softmax_quant_spec
    kv_spec = _kv_output_spec(config) if config.kv_cache_post_rope else None
    if not config.kv_cache_post_rope and _kv_output_spec(config) is not None and any(
            getattr(m, QK_ROTATION, None) is not None for m in model.modules()):
        logger.warning("the model has QuaRot's online R3 (qk_rotation), but the KV cache is quantized on the "
                       "k_proj/v_proj outputs, before RoPE, where R3 does not act: it cannot reduce the K-cache "
                       "error. Set Config.kv_cache_post_rope=True to quantize the keys after R3")
    if softmax_spec is None and kv_spec is None:
        return None
    attention = find_attention_modules(model)
    if not attention:
        raise ValueError("Config.softmax_quant_spec / kv_cache_post_rope need transformers attention "
                         "modules (named *self_attn with a config), and this model has none")
    register_attention_implementation()
    patch = AttentionPatch(modules=[], configs=[])
    seen_configs: set[int] = set()
    for name, module in attention:
        if softmax_spec is not None:
            module.softmax_quantizer = FakeQuantize(softmax_spec, name=f"{name}.softmax_quantizer")
        if kv_spec is not None:
            module.key_quantizer = FakeQuantize(kv_spec, name=f"{name}.key_quantizer")
            module.value_quantizer = FakeQuantize(kv_spec, name=f"{name}.value_quantizer")
        patch.modules.append(module)
        module_config = module.config
        if id(module_config) not in seen_configs:
            seen_configs.add(id(module_config))
            patch.configs.append((module_config, module_config._attn_implementation))
            module_config._attn_implementation = ATTN_IMPLEMENTATION
    logger.info("attention quantization on %d modules (softmax: %s, post-RoPE kv: %s)", len(attention),
                softmax_spec is not None, kv_spec is not None)
    return patch
