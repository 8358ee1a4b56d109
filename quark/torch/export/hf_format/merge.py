"""``weight_merge_groups``: one per-tensor weight scale for layers an engine fuses.

vLLM runs ``q_proj``/``k_proj``/``v_proj`` (and ``gate_proj``/``up_proj``) as one fused matmul with
one weight scale. For each group of name patterns (``[["*q_proj", "*k_proj", "*v_proj"]]``) and each
parent module (one attention or MLP block of a decoder layer), the quantized layers of that parent
matching the group become *members*: they get the largest of their weight scales, and their
weights are re-quantized from their dequantized values with it. Only the checkpoint changes; the
model passed to the exporter is left as it is. Input scales are not touched (members read the
same activations, and engines take the largest input scale of a fused layer themselves).

Merging applies to static per-tensor weight scales of symmetric formats (int and fp8); any other
spec in a group (per-channel / per-group, MX, two-stage, asymmetric, differing specs) raises,
naming the group, the layer and its spec.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import torch

from quark.torch.quantization.config.resolve import matches_any
from quark.torch.quantization.config.type import QSchemeType
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
from quark.torch.quantization.nn.modules.weight_layout import pack_weight
from quark.torch.quantization.tensor_quantize import FakeQuantize

logger = logging.getLogger(__name__)


def _spec_text(module: QuantLinear) -> str:
    wq = module.weight_quantizer
    if wq is None:
        return "no weight quantization"
    spec = wq.spec
    parts = [f"dtype={spec.dtype.name}", f"qscheme={(spec.qscheme or QSchemeType.per_tensor).name}"]
    if spec.group_size:
        parts.append(f"group_size={spec.group_size}")
    if spec.scale_format:
        parts.append(f"scale_format={spec.scale_format}")
    if wq.scale_quantizer is not None:
        parts.append("two-stage scales")
    return ", ".join(parts)


def _check_member(group: list[str], name: str, module: QuantLinear) -> None:
    wq = module.weight_quantizer
    why = None
    if wq is None:
        why = "its weight is not quantized"
    elif wq.kind not in ("int", "float") or (wq.spec.qscheme or QSchemeType.per_tensor) != QSchemeType.per_tensor:
        why = "only per_tensor weight scales can be merged (per-channel/per-group and MX scales differ per row)"
    elif wq.scale_quantizer is not None:
        why = "two-stage (quantized) scales cannot be merged"
    elif wq.zero_point is not None and bool(wq.zero_point.any()):
        why = "asymmetric weights (non-zero zero point) cannot share one scale"
    if why is not None:
        raise ValueError(f"JsonExporterConfig.weight_merge_groups: group {group} cannot merge layer {name} "
                         f"({_spec_text(module)}): {why}")


def merge_members(modules: dict[str, QuantLinear], groups: list[list[str]]) -> list[list[str]]:
    """The layer names merged together: per group, the matching quantized siblings of each parent."""
    merged: list[list[str]] = []
    taken: dict[str, list[str]] = {}
    for group in groups:
        by_parent: dict[str, list[str]] = defaultdict(list)
        for name in modules:
            if matches_any(name, group):
                by_parent[name.rpartition(".")[0]].append(name)
        if not by_parent:
            logger.warning("weight_merge_groups: group %s matches no quantized layer", group)
        for names in by_parent.values():
            for name in names:
                if name in taken:
                    raise ValueError(f"JsonExporterConfig.weight_merge_groups: layer {name} is in group "
                                     f"{taken[name]} and in group {group}; a layer can be merged once")
                taken[name] = group
                _check_member(group, name, modules[name])
            specs = {json.dumps(modules[n].weight_quantizer.spec.to_dict(), sort_keys=True) for n in names}
            if len(specs) > 1:
                raise ValueError(f"JsonExporterConfig.weight_merge_groups: group {group} holds layers {names} "
                                 "with different weight specs; merged layers need one spec "
                                 f"({'; '.join(_spec_text(modules[n]) for n in names)})")
            if len(names) > 1:
                merged.append(names)
    return merged


@torch.no_grad()
def merged_weight_state(modules: dict[str, QuantLinear], groups: list[list[str]],
                        members: list[list[str]] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Replacement module state per merged layer: ``{name: {"weight": ..., "weight_quantizer.scale": ...}}``.

    The values are in module (frozen storage) form; the writer converts them like any other state.
    ``members`` (from :func:`merge_members`) limits the work to those layer lists.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for names in (merge_members(modules, groups) if members is None else members):
        scale = torch.stack([modules[n].weight_quantizer.scale.float().reshape(()) for n in names]).amax()
        for name in names:
            module = modules[name]
            wq = module.weight_quantizer
            stage = FakeQuantize(wq.spec, name=f"{name}.weight_quantizer")
            zero = torch.zeros((), dtype=torch.int32) if wq.kind == "int" else None
            stage.set_qparams(scale.to(wq.scale.dtype), zero)
            stored = pack_weight(module.quantized_weight(torch.float32), stage, module.pack_method)
            state = {"weight": stored.weight, "weight_quantizer.scale": stored.scale.reshape(wq.scale.shape)}
            if wq.zero_point is not None and stored.zero_point is not None:
                state["weight_quantizer.zero_point"] = stored.zero_point.to(wq.zero_point.dtype).reshape(
                    wq.zero_point.shape)
            out[name] = state
        logger.info("weight_merge_groups: %s share the weight scale %.6g", names, float(scale))
    return out


__all__ = ["merge_members", "merged_weight_state"]
