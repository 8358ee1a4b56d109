"""``ModelQuantizer`` (layer 8): the pipeline of docs/design.md in one place.

resolve -> pre-quant optimizations -> insert quantizers -> algorithms -> calibrate -> (freeze).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from quark.torch.quantization.algorithm_registry import algorithm_runner
from quark.torch.quantization.calibration import distributed
from quark.torch.quantization.calibration.batches import materialize, model_device, run_batches
from quark.torch.quantization.calibration.layer_forward import forward_layerwise
from quark.torch.quantization.calibration.layerwise import find_decoder_layers
from quark.torch.quantization.calibration.placement import (
    layer_mover,
    modules_outside,
    normalize_device,
    on_device,
    onloaded,
)
from quark.torch.quantization.calibration.weight_source import disk_weights
from quark.torch.quantization.config.config import Config
from quark.torch.quantization.config.resolve import name_matches
from quark.torch.quantization.model_transformation import (
    all_quantizers,
    plan_quantization,
    quant_linears,
    swap_linears,
    undo_swaps,
)
from quark.torch.quantization.moe_experts import all_experts_see_every_token
from quark.torch.quantization.nn.modules.quantize_attention import attach_attention_quantizers
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear

logger = logging.getLogger(__name__)

PRE_QUANT_ALGORITHMS = ("smoothquant", "smooth", "autosmoothquant", "rotation", "quarot")
ADVANCED_ALGORITHMS = ("awq", "gptq")
_SEVERITY = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR, 4: logging.CRITICAL}


@dataclass
class QuantizationSummary:
    """What the last ``quantize_model`` did (also logged at INFO)."""

    quantized: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    calibration_batches: int = 0
    seconds: float = 0.0
    algorithms: list[str] = field(default_factory=list)
    #: seconds of each stage that ran: ``pre_quant`` (rotation, SmoothQuant), ``swap_linears`` (quantizers
    #: inserted, weight quantizers calibrated), ``algorithms`` (AWQ, GPTQ), ``weight_qparams`` (weight quantizers
    #: the algorithms left, when the swap deferred them), ``calibrate`` (activation ranges), ``finalize`` (scales
    #: fixed)
    stage_seconds: dict[str, float] = field(default_factory=dict)


@contextmanager
def _stage(name: str, seconds: dict[str, float]) -> Iterator[None]:
    """A named stage of ``quantize_model``: a ``quark.<name>`` profiler range, its seconds added to ``seconds``."""
    start = time.perf_counter()
    try:
        with record_function(f"quark.{name}"):
            yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


def _algo_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _algo_name(algo: Any) -> str:
    return str(getattr(algo, "name", type(algo).__name__)).lower()


def require_kv_cache_layers(model: nn.Module, config: Config) -> None:
    """A KV-cache scheme whose patterns name no Linear of the model would quantize no cache: refused before any
    work, naming the patterns and the model's attention projections."""
    patterns = list(config.kv_cache_quant_config or {})
    if not patterns:
        return
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if any(name_matches(name, pattern) for name in linears for pattern in patterns):
        return
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linears if "attn" in name or "attention" in name}) or \
        sorted({name.rsplit(".", 1)[-1] for name in linears})
    raise ValueError(
        f"Config.kv_cache_quant_config: the patterns {patterns} match no nn.Linear of {type(model).__name__}, so no "
        f"KV cache would be quantized; its attention's Linears are named {leaves[:12]}. Name the key/value "
        "projections (LLMTemplate(kv_layer_name=[...]) or the config's kv_cache_quant_config), or quantize "
        "without a KV-cache scheme.")


class ModelQuantizer:
    """Quantize a PyTorch model in place according to a :class:`Config`.

    ``quantize_model(model, calib_dataloader)`` returns the same model object with its
    ``nn.Linear`` layers replaced by fake-quantized ``QuantLinear`` modules; ``freeze(model)``
    turns their weights into real low-bit storage. If ``quantize_model`` raises, the original
    modules are put back (weights are only changed by algorithms that say so).

    Under an initialised ``torch.distributed`` process group of several ranks (``torchrun``), the
    calibration is data-parallel: every rank passes the same model, config and calibration batches,
    takes its share of the batches (``distributed.shard``), and every statistic is reduced over the
    ranks, so each rank ends with the model a one-process run on all the batches gives. With
    ``data_already_split=True`` each rank passes its own share instead. Mismatched configs, models
    or batch lists are refused before any work (``ValueError`` naming what differs on which rank).

    ``compute_device`` (e.g. ``"cuda"``) is where the work runs. The model may sit anywhere: on that
    device, in CPU memory, or spread over devices (an accelerate device map); when it is not wholly
    on the compute device, every stage (algorithms, calibration, ``freeze``) moves one decoder layer
    at a time there and back. Default: the device of the model's first parameter.

    Static activation ranges are observed, as amd-quark 0.13 observes them, on the float model:
    while calibrating, integer and scaled-float quantizers (weights, dynamic activations) pass
    their input through, and only block formats (MX, MX6/MX9, BFP16) quantize. With
    ``calibrate_on_quantized=True`` they quantize, so each range is that of the activations the
    quantized model will see.
    """

    def __init__(self, config: Config, multi_device: bool = False, *, calibrate_all_experts: bool = False,
                 calibrate_on_quantized: bool = False, compute_device: torch.device | str | None = None,
                 data_already_split: bool = False) -> None:
        if not isinstance(config, Config):
            raise ValueError(f"ModelQuantizer(config=...) needs a quark Config, got {type(config).__name__}")
        self.config = config
        self.multi_device = multi_device
        self.compute_device = _checked_device(compute_device)
        self.calibrate_all_experts = bool(calibrate_all_experts)
        self.calibrate_on_quantized = bool(calibrate_on_quantized)
        self.data_already_split = bool(data_already_split)
        self.summary = QuantizationSummary()
        level = config.log_severity_level
        if level is not None:
            if level not in _SEVERITY:
                raise ValueError(f"Config.log_severity_level={level!r} is not one of: 0, 1, 2, 3, 4")
            logging.getLogger("quark").setLevel(_SEVERITY[level])

    def _split_algorithms(self) -> tuple[list[Any], list[Any]]:
        pre = list(_algo_list(self.config.pre_quant_opt_config))
        advanced: list[Any] = []
        for algo in _algo_list(self.config.algo_config):
            name = _algo_name(algo)
            if name in PRE_QUANT_ALGORITHMS:
                pre.append(algo)
            elif name in ADVANCED_ALGORITHMS:
                advanced.append(algo)
            else:
                known = ", ".join(PRE_QUANT_ALGORITHMS + ADVANCED_ALGORITHMS)
                raise ValueError(f"Config.algo_config has an algorithm named {name!r}; known: {known}")
        return pre, advanced

    def quantize_model(self, model: nn.Module, dataloader: Iterable[Any] | None = None) -> nn.Module:
        """Insert quantizers, run algorithms and calibration; return ``model`` (modified in place)."""
        start = time.perf_counter()
        if not isinstance(model, nn.Module):
            raise ValueError(f"quantize_model(model=...) needs an nn.Module, got {type(model).__name__}")
        pre, advanced = self._split_algorithms()
        require_kv_cache_layers(model, self.config)
        plan, excluded = plan_quantization(model, self.config)
        if not plan:
            logger.warning("no module matched the quantization config: nothing to quantize")
        needs_data = bool(pre or advanced) or any(
            spec is not None and not spec_is_dynamic_or_free(spec)
            for item in plan for spec in (item.config.input_tensors, item.config.output_tensors)
        ) or (self.config.softmax_quant_spec is not None
              and not spec_is_dynamic_or_free(self.config.softmax_quant_spec))
        batches = materialize(dataloader, required=needs_data)
        batches = distributed.split_batches(batches, self._rank_facts(model), self.data_already_split)
        device = self.compute_device or normalize_device(model_device(model))
        layerwise = not on_device(model, device)
        if layerwise:
            logger.info("the model is not wholly on %s: every stage runs one decoder layer at a time there", device)
        was_training = model.training
        model.eval()
        records = []
        attention_patch = None
        stages: dict[str, float] = {}
        try:
            if pre:
                with _stage("pre_quant", stages):
                    algorithm_runner("pre_quant")(model, pre, self.config, batches, device)
                plan, excluded = plan_quantization(model, self.config)
            # AWQ and GPTQ change weights one decoder layer at a time and leave every weight quantizer of the layer
            # matching its weight (fixed by GPTQ, or refreshed) while the layer is on the compute device. A model not
            # wholly there therefore skips calibrating them while swapping (a pass over all of its weights in CPU
            # memory, or a read of every layer from disk); the quantizers no algorithm derived are calibrated after.
            deferred = layerwise and bool(advanced)
            with _stage("swap_linears", stages):
                records = _swap_linears(model, plan, device, records, calibrate_weights=not deferred)
            attention_patch = attach_attention_quantizers(model, self.config)
            if advanced:
                with _stage("algorithms", stages):
                    algorithm_runner("advanced")(model, advanced, self.config, batches, device)
            if deferred:
                with _stage("weight_qparams", stages):
                    _calibrate_missing_weights(model, device)
            quantizers = all_quantizers(model)
            if any(q.observing or (q.scale_quantizer is not None and q.scale_quantizer.observing)
                   for q in quantizers):
                routing = all_experts_see_every_token(model) if self.calibrate_all_experts else nullcontext()
                scaled = nullcontext() if self.calibrate_on_quantized else _scaled_quantizers_off(quantizers)
                with routing, scaled, _stage("calibrate", stages):
                    if layerwise:
                        _calibrate_layerwise(model, batches, device, quantizers)
                    else:
                        run_batches(model, batches, desc="Calibrating", merge=_merge_invariant(quantizers),
                                    forget=lambda: _forget_statistics(quantizers))
            with _stage("finalize", stages):
                self._finalize(quantizers)
            distributed.verify_identical(model)
        except BaseException:
            if attention_patch is not None:
                attention_patch.undo()
            undo_swaps(records)
            model.train(was_training)
            raise
        model.quark_compute_device = device
        self.summary = QuantizationSummary(
            quantized=[p.name for p in plan], excluded=excluded, calibration_batches=len(batches),
            seconds=time.perf_counter() - start, algorithms=[_algo_name(a) for a in pre + advanced],
            stage_seconds=stages,
        )
        logger.info("quantized %d linear layers (%d excluded) with %d calibration batches in %.1f s (%s)",
                    len(plan), len(excluded), len(batches), self.summary.seconds,
                    ", ".join(f"{name} {sec:.1f} s" for name, sec in stages.items()))
        return model

    def _finalize(self, quantizers: list[Any]) -> None:
        """Reduce the observers over data-parallel ranks and fix every quantizer's scales; an error names the cause
        when a quantizer saw nothing."""
        distributed.reduce_observers([part.observer for q in quantizers for part in (q, q.scale_quantizer)
                                      if part is not None and part.observing and part.observer is not None])
        for quantizer in quantizers:
            try:
                quantizer.finalize()
            except RuntimeError as error:
                if not self.calibrate_all_experts and ".experts." in (quantizer.name or ""):
                    raise RuntimeError(f"{error} (a mixture-of-experts expert the router never picked for "
                                       "the calibration tokens: use more data, or "
                                       "ModelQuantizer(..., calibrate_all_experts=True) / "
                                       "--calibrate_all_experts to run every expert on every token while "
                                       "calibrating)") from error
                if (quantizer.name or "").endswith(("key_quantizer", "value_quantizer", "softmax_quantizer")):
                    raise RuntimeError(f"{error} (this model's attention does not run through transformers' "
                                       "attention interface, so post-RoPE KV-cache and softmax quantization "
                                       "cannot reach it; quantize the KV cache at the k/v projection outputs "
                                       "instead: kv_cache_post_rope=False)") from error
                raise

    def _rank_facts(self, model: nn.Module) -> dict[str, str]:
        """What every rank of a data-parallel run must agree on (digests; compared before any work)."""
        if not distributed.active():
            return {}
        options = (self.calibrate_all_experts, self.calibrate_on_quantized, self.data_already_split)
        return {"config": distributed.digest(self.config.to_dict()),
                "ModelQuantizer options": distributed.digest(options),
                "model structure": distributed.digest([(n, list(p.shape), str(p.dtype))
                                                       for n, p in model.named_parameters()])}

    @staticmethod
    def freeze(model: nn.Module, pack_method: str = "reorder", device: torch.device | str | None = None) -> nn.Module:
        """Store every quantized weight in its real low-bit form (idempotent); returns ``model``.

        Runs on ``device`` (default: the compute device ``quantize_model`` used), one decoder layer at a
        time when the model is not wholly there; each layer returns to where it was, now smaller.
        """
        layers = quant_linears(model)
        if not layers:
            raise ValueError("freeze(model): the model has no quantized layers; run "
                             "ModelQuantizer.quantize_model first")
        device = device if device is not None else getattr(model, "quark_compute_device", None)
        device = normalize_device(device) if device is not None else None
        if device is None and disk_weights(model) is not None:
            device = torch.device("cpu")
        if device is None or on_device(model, device):
            for _, module in layers:
                module.freeze(pack_method)
        else:
            for unit in _units_loaded(model, device, weights_change=True):
                for module in unit.modules():
                    if isinstance(module, QuantLinear):
                        module.freeze(pack_method)
        for quantizer in all_quantizers(model):
            quantizer.finalize()
        return model


def _merge_invariant(quantizers: list[Any]) -> bool:
    """Whether calibrating on merged batches records what the batches one by one would (every stage says so)."""
    return all(part.merge_invariant for q in quantizers for part in (q, q.scale_quantizer) if part is not None)


def _checked_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"ModelQuantizer(compute_device={device!r}) is not a device; use e.g. 'cpu', 'cuda', "
                         "'cuda:1'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"ModelQuantizer(compute_device={device!r}): no CUDA device is available here")
    return normalize_device(resolved)


def _placement_units(model: nn.Module) -> list[nn.Module]:
    """What moves to the compute device as one piece: each decoder layer, then each quantized module
    outside them (e.g. a quantized ``lm_head``)."""
    try:
        _, layers = find_decoder_layers(model)
    except ValueError:
        return [m for _, m in quant_linears(model)]
    inside = {id(m) for m in layers.modules()}
    return [*layers, *(m for _, m in quant_linears(model) if id(m) not in inside)]


def _units_loaded(model: nn.Module, device: torch.device, weights_change: bool) -> Iterator[nn.Module]:
    """The model once when it is wholly on ``device``; else each placement unit in turn, loaded there
    (``placement.onloaded``) while the caller works on it. Units in CPU memory cross to a GPU and back on a
    background thread (``placement.LayerMover``: the next one read ahead, a finished one written back)."""
    if on_device(model, device):
        yield model
        return
    units = _placement_units(model)
    mover = layer_mover(device, trim=False)  # no heap trimming per unit here, as before the mover
    try:
        for k, unit in enumerate(units):
            ready = mover.take(unit) if mover is not None else None
            with onloaded(unit, device, weights_change=weights_change, ready=ready,
                          mover=mover if weights_change else None):
                if mover is not None and k + 1 < len(units):
                    mover.read_ahead(units[k + 1])
                yield unit
        if mover is not None:
            mover.wait()
    finally:
        if mover is not None:
            mover.close()


def _swap_linears(model: nn.Module, plan: list[Any], device: torch.device, records: list[Any],
                  calibrate_weights: bool = True) -> list[Any]:
    """``swap_linears``; for a model on disk whose weight quantizers calibrate now, one placement unit at a time,
    loaded on ``device``. ``records`` collects the swaps done, for undoing on error."""
    if disk_weights(model) is None or not calibrate_weights:
        records.extend(swap_linears(model, plan, calibrate_weights=calibrate_weights))
        return records
    for unit, items in _by_unit(model, plan, lambda item: item.name).items():
        with onloaded(model.get_submodule(unit), device, weights_change=False):
            records.extend(swap_linears(model, items))
    return records


def _by_unit(model: nn.Module, items: list[Any], name_of: Any) -> dict[str, list[Any]]:
    """``items`` grouped by placement unit: the decoder layer holding each (named by ``name_of``), else itself."""
    try:
        path, layers = find_decoder_layers(model)
        layer_names = {f"{path}.{i}" for i in range(len(layers))}
    except ValueError:
        layer_names = set()
    groups: dict[str, list[Any]] = {}
    for item in items:
        parts = name_of(item).split(".")
        unit = next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in layer_names),
                    name_of(item))
        groups.setdefault(unit, []).append(item)
    return groups


def _calibrate_missing_weights(model: nn.Module, device: torch.device) -> None:
    """Calibrate the weight quantizers still without parameters (swapped uncalibrated, and not derived by an
    algorithm: linears outside the decoder layers, or ones no algorithm targeted), one unit at a time on
    ``device``, reading only the units that have any."""
    missing = [(name, module) for name, module in quant_linears(model) if module.weight_qparams_missing()]
    for unit, linears in _by_unit(model, missing, lambda item: item[0]).items():
        with onloaded(model.get_submodule(unit), device, weights_change=False):
            for _, module in linears:
                module.recalibrate_weight()


def _calibrate_layerwise(model: nn.Module, batches: list[Any], device: torch.device, quantizers: list[Any]) -> None:
    """The calibration forward, one decoder layer at a time on ``device`` (model not wholly there).

    The modules after the decoder layers run too when a quantizer there still observes. New
    statistics and scales land on the compute device; each quantizer then goes back to its module.
    """
    _, layers = find_decoder_layers(model)
    outside = {id(m) for m in modules_outside(model, layers)}
    tail_observes = any(id(module) in outside and any(q.observing for q in _own_quantizers(module))
                        for module in model.modules())
    forward_layerwise(model, batches, device, merge=_merge_invariant(quantizers), run_tail=tail_observes)


def _own_quantizers(module: nn.Module) -> list[Any]:
    from quark.torch.quantization.tensor_quantize import FakeQuantize

    return [child for child in module.children() if isinstance(child, FakeQuantize)]


@contextmanager
def _scaled_quantizers_off(quantizers: list[Any]) -> Iterator[None]:
    """Let integer and scaled-float quantizers pass their input through (observers still record).

    A dynamic quantizer whose second stage still observes (two-stage specs: its per-call scales
    calibrate a static scale of the scales) keeps running, or that second stage would see nothing.
    """
    paused = [q for q in quantizers if q.needs_qparams and q.fake_quant_enabled
              and not (q.scale_quantizer is not None and q.scale_quantizer.observing)]
    for quantizer in paused:
        quantizer.disable_fake_quant()
    try:
        yield
    finally:
        for quantizer in paused:
            quantizer.enable_fake_quant()


def _forget_statistics(quantizers: list[Any]) -> None:
    for quantizer in quantizers:
        for part in (quantizer, quantizer.scale_quantizer):
            if part is not None and part.observing and part.observer is not None:
                part.observer.reset_state()


def spec_is_dynamic_or_free(spec: Any) -> bool:
    """True for specs that need no calibration data (dynamic, casts, block formats)."""
    first = spec[0] if isinstance(spec, (list, tuple)) else spec
    return bool(first.is_dynamic) or first.kind not in ("int", "float")


__all__ = ["ModelQuantizer", "QuantLinear", "QuantizationSummary"]
