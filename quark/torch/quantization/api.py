"""``ModelQuantizer`` (layer 8): the pipeline of DESIGN.md in one place.

resolve -> pre-quant optimizations -> insert quantizers -> algorithms -> calibrate -> (freeze).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from quark.torch.quantization.calibration.batches import materialize, model_device, run_batches
from quark.torch.quantization.config.config import Config
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


def _algo_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _algo_name(algo: Any) -> str:
    return str(getattr(algo, "name", type(algo).__name__)).lower()


class ModelQuantizer:
    """Quantize a PyTorch model in place according to a :class:`Config`.

    ``quantize_model(model, calib_dataloader)`` returns the same model object with its
    ``nn.Linear`` layers replaced by fake-quantized ``QuantLinear`` modules; ``freeze(model)``
    turns their weights into real low-bit storage. If ``quantize_model`` raises, the original
    modules are put back (weights are only changed by algorithms that say so).

    Static activation ranges are observed, as amd-quark 0.13 observes them, on the float model:
    while calibrating, integer and scaled-float quantizers (weights, dynamic activations) pass
    their input through, and only block formats (MX, MX6/MX9, BFP16) quantize. With
    ``calibrate_on_quantized=True`` they quantize, so each range is that of the activations the
    quantized model will see.
    """

    def __init__(self, config: Config, multi_device: bool = False, *, calibrate_all_experts: bool = False,
                 calibrate_on_quantized: bool = False) -> None:
        if not isinstance(config, Config):
            raise ValueError(f"ModelQuantizer(config=...) needs a quark Config, got {type(config).__name__}")
        self.config = config
        self.multi_device = multi_device
        self.calibrate_all_experts = bool(calibrate_all_experts)
        self.calibrate_on_quantized = bool(calibrate_on_quantized)
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
        plan, excluded = plan_quantization(model, self.config)
        if not plan:
            logger.warning("no module matched the quantization config: nothing to quantize")
        needs_data = bool(pre or advanced) or any(
            spec is not None and not spec_is_dynamic_or_free(spec)
            for item in plan for spec in (item.config.input_tensors, item.config.output_tensors)
        ) or (self.config.softmax_quant_spec is not None
              and not spec_is_dynamic_or_free(self.config.softmax_quant_spec))
        batches = materialize(dataloader, required=needs_data)
        device = model_device(model)
        was_training = model.training
        model.eval()
        records = []
        attention_patch = None
        try:
            if pre:
                from quark.torch.algorithm.api import apply_pre_quant_optimization

                apply_pre_quant_optimization(model, pre, self.config, batches, device)
                plan, excluded = plan_quantization(model, self.config)
            records = swap_linears(model, plan)
            attention_patch = attach_attention_quantizers(model, self.config)
            if advanced:
                from quark.torch.algorithm.api import apply_advanced_algorithm

                apply_advanced_algorithm(model, advanced, self.config, batches, device)
                for _, module in quant_linears(model):
                    module.recalibrate_weight()
            quantizers = all_quantizers(model)
            if any(q.observing or (q.scale_quantizer is not None and q.scale_quantizer.observing)
                   for q in quantizers):
                routing = all_experts_see_every_token(model) if self.calibrate_all_experts else nullcontext()
                scaled = nullcontext() if self.calibrate_on_quantized else _scaled_quantizers_off(quantizers)
                with routing, scaled:
                    run_batches(model, batches, desc="Calibrating", merge=_merge_invariant(quantizers),
                                forget=lambda: _forget_statistics(quantizers))
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
        except BaseException:
            if attention_patch is not None:
                attention_patch.undo()
            undo_swaps(records)
            model.train(was_training)
            raise
        self.summary = QuantizationSummary(
            quantized=[p.name for p in plan], excluded=excluded, calibration_batches=len(batches),
            seconds=time.perf_counter() - start, algorithms=[_algo_name(a) for a in pre + advanced],
        )
        logger.info("quantized %d linear layers (%d excluded) with %d calibration batches in %.1f s",
                    len(plan), len(excluded), len(batches), self.summary.seconds)
        return model

    @staticmethod
    def freeze(model: nn.Module, pack_method: str = "reorder") -> nn.Module:
        """Store every quantized weight in its real low-bit form (idempotent); returns ``model``."""
        layers = quant_linears(model)
        if not layers:
            raise ValueError("freeze(model): the model has no quantized layers; run "
                             "ModelQuantizer.quantize_model first")
        for _, module in layers:
            module.freeze(pack_method)
        for quantizer in all_quantizers(model):
            quantizer.finalize()
        return model


def _merge_invariant(quantizers: list[Any]) -> bool:
    """Whether calibrating on merged batches records what the batches one by one would (every stage says so)."""
    return all(part.merge_invariant for q in quantizers for part in (q, q.scale_quantizer) if part is not None)


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
