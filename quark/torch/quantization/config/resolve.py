"""Which ``QuantizationConfig`` each module gets (layer 6): one matcher, one precedence.

Precedence, highest first: ``exclude`` (fnmatch patterns) > ``layer_quant_config`` (exact name, then
fnmatch patterns in insertion order) > ``layer_type_quant_config`` (module class or class name) >
``global_quant_config``. As the Quark documentation specifies, a tensor field left ``None`` in a
more specific config falls back to the next level (e.g. a ``layer_quant_config`` entry that only
sets ``output_tensors`` keeps the global input and weight specs). ``kv_cache_quant_config``
entries act like ``layer_quant_config`` entries placed after them.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from quark.torch.quantization.config.config import Config, QuantizationConfig

TENSOR_FIELDS = ("input_tensors", "output_tensors", "weight", "bias")


@dataclass(frozen=True)
class Resolution:
    """The outcome for one module: its effective config (None = not quantized) and why."""

    name: str
    module_type: str
    rule: str
    config: QuantizationConfig | None


def name_matches(name: str, pattern: str) -> bool:
    """True when ``pattern`` (exact name or fnmatch pattern) matches the qualified module name."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def matches_any(name: str, patterns: list[str]) -> bool:
    """True when any of ``patterns`` (exact names or fnmatch patterns) matches the module name."""
    return any(name_matches(name, pattern) for pattern in patterns)


def _by_name(name: str, table: dict[str, QuantizationConfig] | None) -> tuple[str, QuantizationConfig] | None:
    if not table:
        return None
    if name in table:
        return name, table[name]
    for pattern, cfg in table.items():
        if name_matches(name, pattern):
            return pattern, cfg
    return None


def _by_type(module: nn.Module, table: dict | None) -> tuple[str, QuantizationConfig] | None:
    if not table:
        return None
    for key, cfg in table.items():
        if isinstance(key, type):
            if type(module) is key:
                return key.__name__, cfg
        elif type(module).__name__ == key:
            return str(key), cfg
    for key, cfg in table.items():
        if isinstance(key, type) and isinstance(module, key):
            return key.__name__, cfg
    return None


def _merge(levels: list[QuantizationConfig]) -> QuantizationConfig:
    """Field-wise first non-None across ``levels`` (most specific first)."""
    merged = levels[0]
    for field in TENSOR_FIELDS:
        if getattr(merged, field) is None:
            for cfg in levels[1:]:
                value = getattr(cfg, field)
                if value is not None:
                    merged = replace(merged, **{field: value})
                    break
    return merged


def resolve(name: str, module: nn.Module, config: Config) -> Resolution:
    """The effective config of ``module`` named ``name`` under ``config``, with the rule that decided."""
    module_type = type(module).__name__
    for pattern in config.exclude or []:
        if name_matches(name, pattern):
            return Resolution(name, module_type, f"exclude:{pattern}", None)
    levels: list[QuantizationConfig] = []
    rules: list[str] = []
    hit = _by_name(name, config.layer_quant_config)
    if hit:
        rules.append(f"layer_quant_config:{hit[0]}")
        levels.append(hit[1])
    hit = _by_name(name, getattr(config, "kv_cache_quant_config", None))
    if hit:
        rules.append(f"kv_cache_quant_config:{hit[0]}")
        levels.append(hit[1])
    hit = _by_type(module, config.layer_type_quant_config)
    if hit:
        rules.append(f"layer_type_quant_config:{hit[0]}")
        levels.append(hit[1])
    if config.global_quant_config is not None:
        rules.append("global_quant_config")
        levels.append(config.global_quant_config)
    if not levels:
        return Resolution(name, module_type, "none", None)
    merged = _merge(levels)
    if getattr(config, "kv_cache_post_rope", False) and merged.output_tensors is not None \
            and _by_name(name, getattr(config, "kv_cache_quant_config", None)):
        # the KV cache is then quantized after RoPE inside attention, not at the k/v projection outputs
        merged = replace(merged, output_tensors=None)
        rules.append("kv_cache_post_rope")
    if all(getattr(merged, f) is None for f in TENSOR_FIELDS):
        return Resolution(name, module_type, rules[0], None)
    return Resolution(name, module_type, rules[0], merged)


def resolve_module_config(name: str, module: nn.Module, config: Config) -> QuantizationConfig | None:
    """Shortcut for ``resolve(...).config``."""
    return resolve(name, module, config).config


def is_quantizable(module: nn.Module) -> bool:
    """Modules that are swapped for quantized versions (``nn.Linear`` and its subclasses)."""
    return isinstance(module, nn.Linear)


def explain(model: nn.Module, config: Config) -> list[Resolution]:
    """One row per quantizable module: the rule that matched and the effective config."""
    return [resolve(name, module, config) for name, module in model.named_modules()
            if is_quantizable(module)]
