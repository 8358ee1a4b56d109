"""Scaling groups: parsed from configs, or discovered from one hooked forward of a decoder block.

A scaling group says "the input of ``layers`` is produced by ``prev_op``, so a per-channel factor
can move between them". Configs give groups as dicts (the seeds' ``scaling_layers`` format, names
relative to a decoder layer); :func:`discover_scaling_groups` finds them without any family
table: Linears that receive the same tensor form a group; a norm whose output *is* that tensor,
or a Linear whose per-channel output scaling provably reaches the group's input unchanged
(checked by perturbing it and re-running the block), is the producer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from quark.torch.algorithm.utils.condition import evaluate_condition
from quark.torch.algorithm.utils.probe import close, tolerance
from quark.torch.algorithm.utils.scaling import expand_scales, find_head_dim
from quark.torch.quantization.calibration.layerwise import (
    capture_decoder_inputs,
    find_decoder_layers,
    float_linears,
    layer_output_tensor,
    move_to,
)
from quark.torch.quantization.calibration.placement import probing

logger = logging.getLogger(__name__)

_GROUP_KEYS = ("prev_op", "layers", "inp", "module2inspect", "has_kwargs", "condition", "help")


@dataclass
class ScalingGroup:
    """One ``scaling_layers`` entry: names are relative to a decoder layer."""

    prev_op: str
    layers: list[str]
    inp: str
    module2inspect: str | None = None
    has_kwargs: bool = False
    condition: str | None = None
    help: str | None = None
    #: Discovered in a model whose decoder layers differ (dense and mixture-of-experts MLPs): the group
    #: applies to the layers holding all its modules (not written to configs).
    only_where_present: bool = field(default=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], owner: str = "scaling_layers") -> ScalingGroup:
        unknown = set(d) - set(_GROUP_KEYS)
        if unknown:
            raise ValueError(f"{owner}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(_GROUP_KEYS)}")
        for key in ("prev_op", "layers"):
            if not d.get(key):
                raise ValueError(f"{owner}: entry {d!r} lacks {key!r}")
        layers = d["layers"]
        if isinstance(layers, str) or not all(isinstance(x, str) for x in layers):
            raise ValueError(f"{owner}.layers={layers!r} must be a list of module names")
        return cls(prev_op=d["prev_op"], layers=list(layers), inp=d.get("inp") or layers[0],
                   module2inspect=d.get("module2inspect") or None, has_kwargs=bool(d.get("has_kwargs", False)),
                   condition=d.get("condition"), help=d.get("help"))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()
                if k in _GROUP_KEYS and (v is not None or k == "module2inspect")}


def group_present(layer: nn.Module, group: ScalingGroup) -> bool:
    """Whether ``layer`` holds every module ``group`` names (its linears as ``nn.Linear``)."""
    def get(name: str | None) -> nn.Module | None:
        if not name:
            return layer
        try:
            return layer.get_submodule(name)
        except AttributeError:
            return None

    return (get(group.prev_op) is not None and get(group.inp) is not None
            and (not group.module2inspect or get(group.module2inspect) is not None)
            and all(isinstance(get(n), nn.Linear) for n in group.layers))


def applies_to(layer: nn.Module, group: ScalingGroup) -> bool:
    """Whether ``group`` is to be used in ``layer``: not a group found in other layers only, nor one whose
    ``condition`` does not hold there (its names are then not looked up in that layer either)."""
    return (not group.only_where_present or group_present(layer, group)) and evaluate_condition(group.condition,
                                                                                                 layer)


def submodule(layer: nn.Module, name: str | None, owner: str) -> nn.Module:
    """``layer.get_submodule(name)`` with an error that names the config field; '' is the layer."""
    if not name:
        return layer
    try:
        return layer.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{owner}: {name!r} names no module of the decoder layer "
                         f"{type(layer).__name__}") from None


def _norm_like(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (not isinstance(m, (nn.Linear, nn.Embedding)) and isinstance(w, torch.Tensor)
            and w.dim() == 1 and len(list(m.children())) == 0)


def _common_parent(names: Sequence[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


@dataclass
class _Trace:
    order: list[str]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    has_kwargs: dict[str, bool]


def _trace_block(layer: nn.Module, args: tuple, kwargs: dict,
                 perturb: tuple[str, torch.Tensor] | None = None) -> _Trace:
    trace = _Trace([], {}, {}, {})
    handles = []
    for name, m in layer.named_modules():
        def hook(mod: nn.Module, a: tuple, k: dict, out: Any, _name: str = name) -> Any:
            if perturb is not None and perturb[0] == _name:
                out = out * perturb[1].to(out.dtype)
            if _name in trace.has_kwargs:
                return out
            if a and isinstance(a[0], torch.Tensor):
                trace.inputs[_name] = a[0].detach()
            if isinstance(out, (torch.Tensor, tuple)):
                with contextlib.suppress(RuntimeError):
                    trace.outputs[_name] = layer_output_tensor(out).detach()
            trace.has_kwargs[_name] = bool(k)
            trace.order.append(_name)
            return out

        if name:
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        with float_linears(layer), torch.no_grad():
            layer(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return trace


def sequential_groups(layer: nn.Module, args: tuple, kwargs: dict,
                      names: Sequence[str] | None = None) -> list[list[str]]:
    """Linears of ``layer`` grouped by shared input, in execution order (GPTQ's true-sequential)."""
    trace = _trace_block(layer, args, kwargs)
    linears = [n for n in trace.order if isinstance(layer.get_submodule(n), nn.Linear)
               and (names is None or n in names) and n in trace.inputs]
    groups: list[list[str]] = []
    for n in linears:
        for g in groups:
            x0 = trace.inputs[g[0]]
            if x0.shape == trace.inputs[n].shape and torch.equal(x0, trace.inputs[n]):
                g.append(n)
                break
        else:
            groups.append([n])
    return groups


def _dummy_batch(model: nn.Module) -> torch.Tensor:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if emb is None:
            raise ValueError("cannot build a probe input: the model has no config.vocab_size or nn.Embedding")
        vocab = emb.num_embeddings
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, 16), generator=gen)


def _is_homogeneous(layer: nn.Module, args: tuple, kwargs: dict, producer: str, consumer: str,
                    base: torch.Tensor, head_dim: int | None) -> bool:
    fc = layer.get_submodule(producer)
    gen = torch.Generator().manual_seed(1)
    s = torch.rand(fc.out_features, generator=gen) * 1.5 + 0.5
    try:
        expanded = expand_scales(s, base.shape[-1], head_dim)
    except ValueError:
        return False
    perturbed = _trace_block(layer, args, kwargs, perturb=(producer, s.to(base.device)))
    x = perturbed.inputs.get(consumer)
    if x is None or x.shape != base.shape:  # e.g. a perturbed MoE router sent other tokens to the expert
        return False
    return torch.allclose(x.float(), base.float() * expanded.to(base.device), rtol=1e-3, atol=1e-5)


def _norm_scaling_is_exact(layer: nn.Module, args: tuple, kwargs: dict, norm: str, readers: Sequence[str],
                           base: torch.Tensor) -> bool:
    """Whether dividing ``norm``'s output by ``s`` and multiplying ``readers``' inputs by ``s`` leaves the layer's
    output (``base``) as it was: false when something else reads the norm's output too (a mixture-of-experts
    router and its routed experts read what the shared expert reads)."""
    gen = torch.Generator().manual_seed(3)
    size = layer.get_submodule(norm).weight.numel()
    s = 2.0 ** torch.randint(-1, 2, (size,), generator=gen).float()  # 0.5, 1, 2: exact in any dtype

    def divide(module: nn.Module, inputs: tuple, output: Any) -> Any:
        return output / s.to(output.device, output.dtype) if isinstance(output, torch.Tensor) else output

    def multiply(module: nn.Module, inputs: tuple) -> tuple:
        return (inputs[0] * s.to(inputs[0].device, inputs[0].dtype), *inputs[1:])

    handles = [layer.get_submodule(norm).register_forward_hook(divide)]
    handles += [layer.get_submodule(n).register_forward_pre_hook(multiply) for n in readers]
    try:
        scaled = _layer_output(layer, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return close(scaled, base, tolerance(base.dtype))


def _layer_output(layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    with float_linears(layer):
        return layer_output_tensor(layer(*args, **kwargs)).detach()


def _structure(layer: nn.Module) -> tuple[tuple[str, str], ...]:
    return tuple((name, type(m).__name__) for name, m in layer.named_modules())


@torch.no_grad()
def discover_scaling_groups(model: nn.Module, batches: Sequence[Any] | None = None,
                            decoder_path: str | None = None) -> tuple[str, list[ScalingGroup]]:
    """Find ``(decoder path, scaling groups)`` from one hooked forward of the first decoder layer of each
    structure (models mixing dense and mixture-of-experts layers have two; each traced on the first layer's
    inputs, which is enough to see what reads what). A group missing from some layers applies to the
    layers that hold its modules (``only_where_present``)."""
    path, layers = find_decoder_layers(model, decoder_path)
    groups: list[ScalingGroup] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    # a model on disk: layer 0 and the modules outside the layers read for the probe, other layers as they run
    with probing(model, layers):
        probe = list(batches[:1]) if batches else [_dummy_batch(model)]
        cache = capture_decoder_inputs(model, probe, layers)
        for layer in layers:
            structure = _structure(layer)
            if structure in seen:
                continue
            seen.add(structure)
            for group in _discover_in_layer(layer, cache.args[0], cache.kwargs_for(layer)[0]):
                if group not in groups:
                    groups.append(group)
    if len(seen) > 1:
        for group in groups:
            group.only_where_present = not all(group_present(layer, group) for layer in layers)
        logger.info("the decoder layers have %d structures; %d scaling group(s) apply only to the layers "
                    "holding their modules", len(seen), sum(g.only_where_present for g in groups))
    return path, groups


def _discover_in_layer(layer: nn.Module, layer_args: tuple, layer_kwargs: dict) -> list[ScalingGroup]:
    # a layer of a model on disk is read when it runs: its parameters are on the meta device until then
    device = next((p.device for p in layer.parameters() if p.device.type != "meta"), torch.device("cpu"))
    args, kwargs = move_to(layer_args, device), move_to(layer_kwargs, device)
    trace = _trace_block(layer, args, kwargs)
    head_dim = find_head_dim(layer)
    groups: list[ScalingGroup] = []
    base: torch.Tensor | None = None  # the layer's output, for the norm groups' exactness check
    for shared in sequential_groups(layer, args, kwargs):
        x = trace.inputs[shared[0]]
        prev: str | None = None
        first = trace.order.index(shared[0])
        for name in reversed(trace.order[:first]):
            m = layer.get_submodule(name)
            out = trace.outputs.get(name)
            if _norm_like(m) and out is not None and out.shape == x.shape and torch.equal(out, x):
                if base is None:
                    base = _layer_output(layer, args, kwargs)
                if _norm_scaling_is_exact(layer, args, kwargs, name, shared, base):
                    prev = name
                else:
                    logger.info("%s: its output is read by more than %s (e.g. a router); group skipped", name, shared)
                    prev = ""
                break
        if prev == "":
            continue
        if prev is None:
            for name in reversed(trace.order[:first]):
                if isinstance(layer.get_submodule(name), nn.Linear) and name not in shared and \
                        _is_homogeneous(layer, args, kwargs, name, shared[0], x, head_dim):
                    prev = name
                    break
        if prev is None:
            logger.info("no scalable producer found for %s; group skipped", shared)
            continue
        inspect = None
        if len(shared) > 1:
            inspect = _common_parent(shared)
        has_kwargs = bool(trace.has_kwargs.get(inspect, False)) if inspect else False
        groups.append(ScalingGroup(prev_op=prev, layers=list(shared), inp=shared[0],
                                   module2inspect=inspect, has_kwargs=has_kwargs))
    return groups


def groups_from_config(cfg: Any, model: nn.Module, batches: Sequence[Any] | None,
                       owner: str) -> tuple[str, list[ScalingGroup]]:
    """Scaling groups from ``cfg.scaling_layers`` when given, else discovered automatically."""
    path, _ = find_decoder_layers(model, getattr(cfg, "model_decoder_layers", None) or None)
    entries = getattr(cfg, "scaling_layers", None)
    if entries:
        return path, [ScalingGroup.from_dict(dict(e), f"{owner}.scaling_layers") for e in entries]
    path, groups = discover_scaling_groups(model, batches, path)
    logger.info("%s: discovered %d scaling groups under %s", owner, len(groups), path)
    return path, groups


def validate_groups(layer: nn.Module, groups: Sequence[ScalingGroup], owner: str) -> None:
    """Check that every name of every group exists in ``layer`` (before any weight is touched); a discovered
    group that applies to other layers only is not checked here."""
    for g in groups:
        if not applies_to(layer, g):
            continue
        submodule(layer, g.prev_op, f"{owner}.prev_op")
        for n in g.layers:
            if not isinstance(submodule(layer, n, f"{owner}.layers"), nn.Linear):
                raise ValueError(f"{owner}.layers: {n!r} is not an nn.Linear")
        submodule(layer, g.inp, f"{owner}.inp")
        if g.module2inspect:
            submodule(layer, g.module2inspect, f"{owner}.module2inspect")
