"""Which ``QuantizationConfig`` each module gets (layer 6): one matcher, one precedence.

Precedence, highest first: ``exclude`` (fnmatch patterns) > ``layer_quant_config`` (exact name, then
fnmatch patterns in insertion order) > ``layer_type_quant_config`` (module class or class name) >
``global_quant_config``. As the Quark documentation specifies, a tensor field left ``None`` in a
more specific config falls back to the next level (e.g. a ``layer_quant_config`` entry that only
sets ``output_tensors`` keeps the global input and weight specs). ``kv_cache_quant_config``
entries act like ``layer_quant_config`` entries placed after them.

Shape fit: :func:`shape_issue` says when a per-group / block spec cannot be applied to a tensor;
:func:`fitting_spec` gives the nearest spec that fits (a smaller power-of-two group, or per-channel
weights) for ``Config.unfit_layers="fallback"``, and :func:`record_unfit` writes the outcome back into
the ``Config`` (``exclude`` or an exact-name ``layer_quant_config`` entry) so exports record it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from torch import nn

from quark.torch.quantization.config.spec import QuantizationSpec
from quark.torch.quantization.config.type import UNFIT_LAYER_MODES, QSchemeType
from quark.torch.quantization.formats.table import format_info

if TYPE_CHECKING:
    from quark.torch.quantization.config.config import Config, QuantizationConfig

TENSOR_FIELDS = ("input_tensors", "output_tensors", "weight", "bias")
COMMON_GROUP_SIZES = (8, 16, 32, 64, 128, 256)
# smaller groups cost more scale storage than they save; below this a layer falls back to per-channel or float
MIN_FALLBACK_GROUP = 8


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


# ---------------------------------------------------------------------------- shape fit
def first_stage(spec: QuantizationSpec | list[QuantizationSpec] | None) -> QuantizationSpec | None:
    """The spec itself, or the first stage of a two-stage (scale-quantized) spec list."""
    if isinstance(spec, (list, tuple)):
        return spec[0] if spec else None
    return spec


def linear_tensor_shapes(linear: nn.Linear) -> dict[str, tuple[int, int]]:
    """The shapes a Linear's quantizers see, per tensor field (activations as ``[1, features]``)."""
    return {"weight": (linear.out_features, linear.in_features), "input_tensors": (1, linear.in_features),
            "output_tensors": (1, linear.out_features)}


def _is_blocked(spec: QuantizationSpec) -> bool:
    return spec.kind in ("mx", "bfp") or spec.qscheme in (QSchemeType.per_group, QSchemeType.per_channel)


def _group_of(spec: QuantizationSpec) -> int | None:
    return spec.group_size or (32 if spec.kind == "mx" else format_info(spec.dtype).block_size)


def group_misfit(shape: tuple[int, ...], spec: QuantizationSpec) -> tuple[int, int] | None:
    """``(dim, group)`` when ``spec``'s group/block size does not divide the blocked dimension, else None."""
    if not _is_blocked(spec) or (spec.qscheme == QSchemeType.per_channel and spec.kind not in ("mx", "bfp")):
        return None
    axis = -1 if spec.ch_axis is None else spec.ch_axis
    if not -len(shape) <= axis < len(shape):
        return None
    group = _group_of(spec)
    dim = shape[axis]
    return (dim, group) if group and dim % group != 0 else None


def shape_issue(name: str, tensor: str, shape: tuple[int, ...], spec: QuantizationSpec) -> str | None:
    """A message when ``spec`` cannot be applied to a tensor of ``shape``, else None."""
    if not _is_blocked(spec):
        return None
    axis = -1 if spec.ch_axis is None else spec.ch_axis
    if not -len(shape) <= axis < len(shape):
        return (f"{name} ({tensor}, shape {list(shape)}): ch_axis={axis} is out of range for a "
                f"{len(shape)}-D tensor; allowed: {-len(shape)}..{len(shape) - 1}")
    misfit = group_misfit(shape, spec)
    if misfit is None:
        return None
    dim, group = misfit
    fits = [g for g in COMMON_GROUP_SIZES if dim % g == 0] or [
        g for g in range(2, min(dim, 256) + 1) if dim % g == 0][:8]
    return (f"{name} ({tensor}, dim {axis} = {dim}): group_size {group} does not divide {dim}; "
            f"group sizes that fit: {fits}")


def layer_shape_issues(name: str, linear: nn.Linear, qconfig: QuantizationConfig) -> list[str]:
    """Every tensor of ``linear`` whose spec in ``qconfig`` does not fit its shape."""
    issues: list[str] = []
    for tensor, shape in linear_tensor_shapes(linear).items():
        spec = first_stage(getattr(qconfig, tensor))
        if spec is None:
            continue
        if tensor != "weight" and spec.qscheme == QSchemeType.per_channel and spec.ch_axis not in (-1, 1):
            continue  # activations are [..., features]; only the feature axis is known here
        issue = shape_issue(name, tensor, shape, spec)
        if issue:
            issues.append(issue)
    return issues


def fitting_spec(spec: QuantizationSpec | list[QuantizationSpec], tensor: str, dim: int, *,
                 per_channel: bool = True) -> QuantizationSpec | list[QuantizationSpec] | None:
    """The nearest spec that fits a blocked dimension of size ``dim``, or None (keep the layer in float).

    Nearest: the same format with the largest power-of-two group (at least ``MIN_FALLBACK_GROUP``,
    a multiple of the format's sub-block) below the requested one that divides ``dim``; failing
    that, for an integer or float weight of a one-stage spec, the same format per output channel
    (unless ``per_channel`` is False: an algorithm that needs per-group weights).
    """
    first = first_stage(spec)
    if first is None:
        return None
    group = _group_of(first) or 0
    sub_block = format_info(first.dtype).sub_block_size or 1
    groups = [g for g in COMMON_GROUP_SIZES
              if MIN_FALLBACK_GROUP <= g < group and dim % g == 0 and g % sub_block == 0]
    fitted: QuantizationSpec | None = None
    if groups:
        fitted = replace(first, group_size=max(groups))
    elif per_channel and tensor == "weight" and first.kind in ("int", "float") and not isinstance(spec, (list, tuple)):
        fitted = replace(first, qscheme=QSchemeType.per_channel, group_size=None, ch_axis=0, observer_cls=None)
    if fitted is None:
        return None
    return [fitted, *spec[1:]] if isinstance(spec, (list, tuple)) else fitted


def describe_spec(spec: QuantizationSpec | list[QuantizationSpec] | None) -> str:
    """Short text of a spec for logs: ``int4 per_group 64``."""
    first = first_stage(spec)
    if first is None:
        return "none"
    qscheme = first.qscheme.name if first.qscheme is not None else first.kind
    group = f" {first.group_size}" if first.qscheme == QSchemeType.per_group else ""
    return f"{first.dtype.name} {qscheme}{group}"


@dataclass(frozen=True)
class UnfitLayer:
    """A layer whose shape does not fit its config, and what ``Config.unfit_layers`` did with it."""

    name: str
    action: str  # "keep" (left in float) | "fallback" (a spec that fits)
    issues: tuple[str, ...]
    changes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.name, "action": self.action, "issues": list(self.issues), "changes": list(self.changes)}

    def describe(self) -> str:
        what = "kept in float" if self.action == "keep" else "fallback: " + "; ".join(self.changes)
        return f"{self.name}: {what} ({'; '.join(self.issues)})"


def fit_layer(name: str, linear: nn.Linear, qconfig: QuantizationConfig, mode: str, *, per_channel: bool = True,
              ) -> tuple[QuantizationConfig | None, UnfitLayer] | None:
    """None when ``qconfig`` fits ``linear``; else (the config it gets, or None for float; the record).

    Only group/block sizes that do not divide are handled; other misfits stay errors.
    """
    if mode not in UNFIT_LAYER_MODES:
        raise ValueError(f"Config.unfit_layers={mode!r} is not one of: {', '.join(UNFIT_LAYER_MODES)}")
    shapes = linear_tensor_shapes(linear)
    specs = {t: spec for t in shapes if (spec := first_stage(getattr(qconfig, t))) is not None}
    misfits = {t: m for t, spec in specs.items() if (m := group_misfit(shapes[t], spec)) is not None}
    if not misfits or mode == "error":
        return None
    issues = tuple(issue for t in misfits if (issue := shape_issue(name, t, shapes[t], specs[t])))
    if mode == "keep":
        return None, UnfitLayer(name, "keep", issues)
    fitted: dict[str, Any] = {}
    for tensor, (dim, _) in misfits.items():
        spec = fitting_spec(getattr(qconfig, tensor), tensor, dim, per_channel=per_channel)
        if spec is None:
            return None, UnfitLayer(name, "keep", issues)
        fitted[tensor] = spec
    changes = tuple(f"{t}: {describe_spec(getattr(qconfig, t))} -> {describe_spec(s)}" for t, s in fitted.items())
    return replace(qconfig, **fitted), UnfitLayer(name, "fallback", issues, changes)


def record_unfit(config: Config, unfit: UnfitLayer, qconfig: QuantizationConfig | None) -> None:
    """Write the outcome into ``config`` by exact layer name, so resolution and exports agree with it."""
    if qconfig is None:
        if unfit.name not in config.exclude:
            config.exclude.append(unfit.name)
    else:
        config.layer_quant_config[unfit.name] = qconfig
