"""Model transformation (layer 6): plan, validate and apply the ``nn.Linear -> QuantLinear`` swap.

Everything that can be checked is checked in :func:`plan_quantization` before any module or
weight changes; :class:`SwapRecord` keeps the original modules so a failed run can put them back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from quark.torch.quantization.config.config import Config, QuantizationConfig, QuantizationSpec
from quark.torch.quantization.config.resolve import is_quantizable, resolve
from quark.torch.quantization.config.type import QSchemeType
from quark.torch.quantization.formats.table import format_info
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
from quark.torch.quantization.tensor_quantize import FakeQuantize

logger = logging.getLogger(__name__)

_COMMON_GROUP_SIZES = (8, 16, 32, 64, 128, 256)


@dataclass
class PlannedModule:
    """A module that will be quantized, with its effective config and the rule that chose it."""

    name: str
    module: nn.Linear
    config: QuantizationConfig
    rule: str


@dataclass
class SwapRecord:
    """One swapped module: enough to undo the swap."""

    parent: nn.Module
    attr: str
    original: nn.Module


def _first_stage(spec: QuantizationSpec | list[QuantizationSpec] | None) -> QuantizationSpec | None:
    if isinstance(spec, (list, tuple)):
        return spec[0] if spec else None
    return spec


def _group_issue(name: str, tensor: str, shape: tuple[int, ...], spec: QuantizationSpec) -> str | None:
    """A message when ``spec`` cannot be applied to a tensor of ``shape``, else None."""
    info = format_info(spec.dtype)
    kind = spec.kind
    blocked = kind in ("mx", "bfp") or spec.qscheme in (QSchemeType.per_group, QSchemeType.per_channel)
    if not blocked:
        return None
    axis = -1 if spec.ch_axis is None else spec.ch_axis
    if not -len(shape) <= axis < len(shape):
        return (f"{name} ({tensor}, shape {list(shape)}): ch_axis={axis} is out of range for a "
                f"{len(shape)}-D tensor; allowed: {-len(shape)}..{len(shape) - 1}")
    if spec.qscheme == QSchemeType.per_channel and kind not in ("mx", "bfp"):
        return None
    group = spec.group_size or (32 if kind == "mx" else info.block_size)
    dim = shape[axis]
    if group and dim % group != 0:
        fits = [g for g in _COMMON_GROUP_SIZES if dim % g == 0] or [
            g for g in range(2, min(dim, 256) + 1) if dim % g == 0][:8]
        return (f"{name} ({tensor}, dim {axis} = {dim}): group_size {group} does not divide {dim}; "
                f"group sizes that fit: {fits}")
    return None


def validate_plan(plan: list[PlannedModule]) -> None:
    """Raise one ``ValueError`` naming every layer whose shape does not fit its config."""
    issues: list[str] = []
    for item in plan:
        linear = item.module
        tensors = {
            "weight": (_first_stage(item.config.weight), (linear.out_features, linear.in_features)),
            "input_tensors": (_first_stage(item.config.input_tensors), (1, linear.in_features)),
            "output_tensors": (_first_stage(item.config.output_tensors), (1, linear.out_features)),
        }
        for tensor, (spec, shape) in tensors.items():
            if spec is None:
                continue
            if tensor != "weight" and spec.qscheme == QSchemeType.per_channel and spec.ch_axis not in (-1, 1):
                # activations are [..., features]; only the feature axis is known here
                continue
            issue = _group_issue(item.name, tensor, shape, spec)
            if issue:
                issues.append(issue)
    if issues:
        listing = "\n  ".join(issues)
        raise ValueError(f"the quantization config does not fit {len(issues)} tensor(s) of this model "
                         f"(nothing was changed):\n  {listing}\nUse a group size that fits, or exclude "
                         "these layers with Config.exclude.")


def plan_quantization(model: nn.Module, config: Config) -> tuple[list[PlannedModule], list[str]]:
    """Resolve every quantizable module; return (modules to quantize, names excluded)."""
    plan: list[PlannedModule] = []
    excluded: list[str] = []
    ignored_types = {type(m).__name__ for m in model.modules() if not is_quantizable(m)}
    for key in config.layer_type_quant_config or {}:
        key_name = key.__name__ if isinstance(key, type) else str(key)
        if key_name in ignored_types or (isinstance(key, type) and not issubclass(key, nn.Linear)):
            logger.warning("layer_type_quant_config entry %s is ignored: only nn.Linear modules are "
                           "quantized in eager mode", key_name)
    for name, module in model.named_modules():
        if not is_quantizable(module) or isinstance(module, QuantLinear):
            continue
        res = resolve(name, module, config)
        if res.config is None:
            excluded.append(name)
            continue
        plan.append(PlannedModule(name, module, res.config, res.rule))
    validate_plan(plan)
    return plan, excluded


def _parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def swap_linears(model: nn.Module, plan: list[PlannedModule]) -> list[SwapRecord]:
    """Replace each planned ``nn.Linear`` by a ``QuantLinear`` sharing its Parameters."""
    records: list[SwapRecord] = []
    try:
        for item in plan:
            parent, attr = _parent_of(model, item.name)
            quantized = QuantLinear.from_float(item.module, item.config, name=item.name)
            _carry_hooks(item.module, quantized)
            setattr(parent, attr, quantized)
            records.append(SwapRecord(parent, attr, item.module))
    except BaseException:
        undo_swaps(records)
        raise
    return records


def _carry_hooks(source: nn.Module, target: nn.Module) -> None:
    """Keep hooks registered on the original module (user hooks, device-placement hooks)."""
    for attr in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                 "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(target, attr).update(getattr(source, attr))
    hf_hook = getattr(source, "_hf_hook", None)
    if hf_hook is not None:  # accelerate device-placement hook (device_map / offload)
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(target, hf_hook)


def undo_swaps(records: list[SwapRecord]) -> None:
    """Put the original modules back (their Parameters were never modified by the swap)."""
    for record in reversed(records):
        setattr(record.parent, record.attr, record.original)


def all_quantizers(model: nn.Module) -> list[FakeQuantize]:
    """Every top-level FakeQuantize in ``model`` (second-stage scale quantizers are reached via their owner)."""
    return [m for n, m in model.named_modules()
            if isinstance(m, FakeQuantize) and not n.endswith("scale_quantizer")]


def quant_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
