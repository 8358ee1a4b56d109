"""Model transformation (layer 6): plan, validate and apply the ``nn.Linear -> QuantLinear`` swap.

Everything that can be checked is checked in :func:`plan_quantization` before any module or
weight changes; :class:`SwapRecord` keeps the original modules so a failed run can put them back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from quark.torch.quantization.config.config import Config, QuantizationConfig
from quark.torch.quantization.config.resolve import (
    UnfitLayer,
    fit_layer,
    is_quantizable,
    layer_shape_issues,
    record_unfit,
    resolve,
)
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
from quark.torch.quantization.tensor_quantize import FakeQuantize

logger = logging.getLogger(__name__)


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


def validate_plan(plan: list[PlannedModule]) -> None:
    """Raise one ``ValueError`` naming every layer whose shape does not fit its config."""
    issues = [issue for item in plan for issue in layer_shape_issues(item.name, item.module, item.config)]
    if issues:
        listing = "\n  ".join(issues)
        raise ValueError(f"the quantization config does not fit {len(issues)} tensor(s) of this model "
                         f"(nothing was changed):\n  {listing}\nUse a group size that fits, exclude these "
                         "layers with Config.exclude, or set Config.unfit_layers='fallback' (each gets the "
                         "nearest format that fits: a smaller group size, or per-channel) or 'keep' (they "
                         "stay in float); on the command line: --unfit_layers fallback|keep.")


def fit_config_to_model(model: nn.Module, config: Config) -> list[UnfitLayer]:
    """Apply ``config.unfit_layers`` to every layer whose shape does not fit its config.

    ``"error"``: raise (as :func:`validate_plan`). ``"keep"`` / ``"fallback"``: each such layer is
    added to ``config.exclude`` or gets an exact-name ``config.layer_quant_config`` entry with the
    nearest spec that fits (logged), so later resolution and exports agree; returns what was done.
    No module is changed.
    """
    mode = getattr(config, "unfit_layers", "error")
    # AWQ searches scales for per-group weights only; a layer it cannot group stays in float
    per_channel = not any(str(getattr(a, "name", "")).lower() == "awq" for a in config.algo_config or [])
    done: list[UnfitLayer] = []
    plan: list[PlannedModule] = []
    for name, module in model.named_modules():
        if not is_quantizable(module) or isinstance(module, QuantLinear) or has_own_forward(module):
            continue
        res = resolve(name, module, config)
        if res.config is None:
            continue
        fitted = fit_layer(name, module, res.config, mode, per_channel=per_channel)
        if fitted is None:
            plan.append(PlannedModule(name, module, res.config, res.rule))
            continue
        qconfig, unfit = fitted
        done.append(unfit)
        if qconfig is not None:
            plan.append(PlannedModule(name, module, qconfig, res.rule))
    validate_plan(plan)
    for unfit in done:
        record_unfit(config, unfit, next((p.config for p in plan if p.name == unfit.name), None))
        logger.warning("unfit_layers=%s: %s", mode, unfit.describe())
    return done


def plan_quantization(model: nn.Module, config: Config) -> tuple[list[PlannedModule], list[str]]:
    """Resolve every quantizable module; return (modules to quantize, names excluded).

    Layers that do not fit their config are handled first as ``config.unfit_layers`` says
    (:func:`fit_config_to_model`).
    """
    if getattr(config, "unfit_layers", "error") != "error":
        fit_config_to_model(model, config)
    plan: list[PlannedModule] = []
    excluded: list[str] = []
    ignored_types = {type(m).__name__ for m in model.modules() if not is_quantizable(m)}
    for key in config.layer_type_quant_config or {}:
        key_name = key.__name__ if isinstance(key, type) else str(key)
        if key_name in ignored_types or (isinstance(key, type) and not issubclass(key, nn.Linear)):
            logger.warning("layer_type_quant_config entry %s is ignored: only nn.Linear modules are "
                           "quantized in eager mode", key_name)
    own_forward: set[str] = set()
    for name, module in model.named_modules():
        if not is_quantizable(module) or isinstance(module, QuantLinear):
            continue
        if has_own_forward(module):
            own_forward.add(type(module).__name__)
            excluded.append(name)
            if resolve(name, module, config).config is not None and name not in config.exclude:
                config.exclude.append(name)  # so exports list it as float: loaders must leave it as it is
            continue
        res = resolve(name, module, config)
        if res.config is None:
            excluded.append(name)
            continue
        plan.append(PlannedModule(name, module, res.config, res.rule))
    for cls in sorted(own_forward):
        logger.info("%s is an nn.Linear with its own forward (e.g. a router returning scores and logits): a "
                    "quantized Linear cannot stand in for it, so it stays float", cls)
    validate_plan(plan)
    return plan, excluded


def has_own_forward(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` subclass that overrides ``forward`` (Llama 4's router returns
    ``(scores, logits)``): replacing it by a ``QuantLinear`` would change what it returns."""
    return isinstance(module, nn.Linear) and not isinstance(module, QuantLinear) and \
        type(module).forward is not nn.Linear.forward


def _parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def swap_linears(model: nn.Module, plan: list[PlannedModule], calibrate_weights: bool = True) -> list[SwapRecord]:
    """Replace each planned ``nn.Linear`` by a ``QuantLinear`` sharing its Parameters (its weight quantizer
    calibrated from the weight, unless ``calibrate_weights`` is False)."""
    records: list[SwapRecord] = []
    try:
        for item in plan:
            parent, attr = _parent_of(model, item.name)
            quantized = QuantLinear.from_float(item.module, item.config, name=item.name,
                                               calibrate_weight=calibrate_weights)
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
