"""SmoothQuant (Xiao et al., 2023) and AutoSmoothQuant on the layerwise runner.

SmoothQuant moves activation outliers into the weights: for each scaling group,
``s = max|x|^alpha / max|W|^(1 - alpha)`` per input channel (clamped below by
``scale_clamp_min``); the producer is divided by ``s`` and the group's linears multiplied by it,
so the float function is unchanged. AutoSmoothQuant searches ``alpha`` per group on a grid,
minimising the MSE or MAE of ``module2inspect``'s output with quantized weights and activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from quark.torch.algorithm.utils.model_info import (
    ScalingGroup,
    applies_to,
    groups_from_config,
    submodule,
    validate_groups,
)
from quark.torch.algorithm.utils.processor import AlgorithmProcessor
from quark.torch.algorithm.utils.quant import simulate_quant
from quark.torch.algorithm.utils.scaling import expand_scales, find_head_dim, reduce_to_prev
from quark.torch.algorithm.utils.scaling_step import ScaleResult, ScalingStep, loss_fn, producer_slice
from quark.torch.quantization.calibration.layerwise import ModelBackup, find_decoder_layers, run_layerwise

ALPHA_GRID = tuple(i / 20 for i in range(21))


def _float_arg(cfg: Any, field: str, default: float, owner: str, lo: float, hi: float) -> float:
    value = getattr(cfg, field, default)
    value = default if value is None else value
    if not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise ValueError(f"{owner}.{field}={value!r} must be a number in [{lo}, {hi}]")
    return float(value)


def smooth_scales(act_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float, clamp_min: float,
                  n_prev: int, head_dim: int | None) -> torch.Tensor:
    """SmoothQuant factors in the producer's space from consumer-space statistics."""
    w_max = torch.stack([w.abs().float().amax(0) for w in weights]).amax(0)
    a = reduce_to_prev(act_max.float(), n_prev, head_dim, "max").clamp(min=1e-5)
    w = reduce_to_prev(w_max, n_prev, head_dim, "max").clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=clamp_min)


class SmoothQuantStep(ScalingStep):
    """Per-layer SmoothQuant with a fixed alpha."""

    owner = "SmoothQuantConfig"

    def __init__(self, groups: Sequence[ScalingGroup], layers: Sequence[nn.Module], alpha: float,
                 clamp_min: float) -> None:
        super().__init__(groups, layers)
        self.alpha = alpha
        self.clamp_min = clamp_min

    @torch.no_grad()
    def search(self, layer: nn.Module, index: int, inputs: list) -> list[ScaleResult]:
        head_dim = find_head_dim(layer)
        results = []
        for g in self.active[index]:
            start, n_prev = producer_slice(layer, g, inputs, self.owner)
            act_max = self.group_abs_max(g)
            weights = [submodule(layer, n, f"{self.owner}.layers").weight for n in g.layers]
            s = smooth_scales(act_max, weights, self.alpha, self.clamp_min, n_prev, head_dim)
            results.append(ScaleResult(index, g.prev_op, list(g.layers), s.cpu(), prev_start=start))
        return results


class AutoSmoothQuantStep(ScalingStep):
    """Per-layer SmoothQuant whose alpha is searched per group (``ALPHA_GRID``)."""

    owner = "AutoSmoothQuantConfig"
    keeps_calls_as_recorded = True  # candidates quantize each call's activations with that call's own range

    def __init__(self, groups: Sequence[ScalingGroup], layers: Sequence[nn.Module],
                 specs: list[dict[str, tuple[Any, Any]]], loss: str, clamp_min: float = 1e-3) -> None:
        super().__init__(groups, layers)
        self.specs = specs  # per layer: name -> (weight spec, input spec)
        self.loss = loss_fn(loss)
        self.clamp_min = clamp_min
        self.alphas: list[tuple[int, str, float | None]] = []  # None: left unsmoothed

    @torch.no_grad()
    def search(self, layer: nn.Module, index: int, inputs: list) -> list[ScaleResult]:
        head_dim = find_head_dim(layer)
        results = []
        for g in self.active[index]:
            start, n_prev = producer_slice(layer, g, inputs, self.owner)
            act_max = self.group_abs_max(g)
            fcs = {n: submodule(layer, n, f"{self.owner}.layers") for n in g.layers}
            module, calls = self.inspect_calls(layer, g)
            reference = self.run(module, calls)
            best, best_loss, best_alpha = None, float("inf"), None
            shadows = {n: fc.__dict__.get("forward") for n, fc in fcs.items()}
            for alpha in (None, *ALPHA_GRID):
                if alpha is None:  # no smoothing is always a candidate
                    s = torch.ones(n_prev, device=act_max.device)
                else:
                    s = smooth_scales(act_max, [fc.weight for fc in fcs.values()], alpha, self.clamp_min,
                                      n_prev, head_dim)
                for n, fc in fcs.items():
                    w_spec, x_spec = self.specs[index].get(n, (None, None))
                    se = expand_scales(s, fc.in_features, head_dim).to(fc.weight.dtype)
                    w_q = simulate_quant(fc.weight * se, w_spec)

                    def fwd(x: torch.Tensor, _fc: nn.Linear = fc, _w: torch.Tensor = w_q,
                            _se: torch.Tensor = se, _spec: Any = x_spec) -> torch.Tensor:
                        return F.linear(simulate_quant(x / _se, _spec), _w, _fc.bias)

                    fc.forward = fwd  # type: ignore[method-assign]
                try:
                    loss = self.loss(self.run(module, calls), reference)
                finally:
                    for n, fc in fcs.items():
                        if shadows[n] is None:
                            del fc.forward
                        else:
                            fc.forward = shadows[n]
                if loss < best_loss:
                    best, best_loss, best_alpha = s, loss, alpha
            if best is None:
                raise RuntimeError(f"AutoSmoothQuant: no finite loss for {g.layers} in decoder layer {index}")
            self.alphas.append((index, g.prev_op, best_alpha))
            results.append(ScaleResult(index, g.prev_op, list(g.layers), best.cpu(), prev_start=start))
        return results


class _ScalingProcessor(AlgorithmProcessor):
    owner = "scaling"

    def __init__(self, model: nn.Module, algo_config: Any, data: Sequence[Any], quant_config: Any = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(model, algo_config, data, quant_config, device)
        self.results: list[ScaleResult] = []

    def _groups(self) -> tuple[str, nn.ModuleList, list[ScalingGroup]]:
        path, groups = groups_from_config(self.cfg, self.model, self.data, self.owner)
        _, layers = find_decoder_layers(self.model, path)
        for layer in layers:
            validate_groups(layer, groups, self.owner)
        return path, layers, groups

    def build_step(self) -> tuple[str, ScalingStep]:
        raise NotImplementedError

    def apply(self, backup: ModelBackup | None = None) -> None:
        path, step = self.build_step()
        run_layerwise(self.model, self.data, [step], self.device, decoder_path=path, backup=backup,
                      desc=self.owner)
        self.results = step.results


class SmoothQuantProcessor(_ScalingProcessor):
    """SmoothQuant: ``SmoothQuantProcessor(model, SmoothQuantConfig(...), data).apply()``."""

    owner = "SmoothQuantConfig"

    def build_step(self) -> tuple[str, ScalingStep]:
        alpha = _float_arg(self.cfg, "alpha", 1.0, self.owner, 0.0, 1.0)
        clamp_min = _float_arg(self.cfg, "scale_clamp_min", 1e-3, self.owner, 0.0, float("inf"))
        path, layers, groups = self._groups()
        return path, SmoothQuantStep(groups, list(layers), alpha, clamp_min)


class AutoSmoothQuantProcessor(_ScalingProcessor):
    """AutoSmoothQuant: per-group alpha search; needs ``quant_config`` for the simulated quantization."""

    owner = "AutoSmoothQuantConfig"

    def build_step(self) -> tuple[str, ScalingStep]:
        from quark.torch.quantization.config.resolve import resolve_module_config

        loss = getattr(self.cfg, "compute_scale_loss", "MSE") or "MSE"
        loss_fn(loss)  # validates before any weight changes
        path, layers, groups = self._groups()
        specs: list[dict[str, tuple[Any, Any]]] = []
        for i, layer in enumerate(layers):
            per = {}
            for g in groups:
                if not applies_to(layer, g):
                    continue
                for n in g.layers:
                    fc = layer.get_submodule(n)
                    resolved = resolve_module_config(f"{path}.{i}.{n}", fc, self.quant_config)
                    if resolved is not None:
                        per[n] = (getattr(resolved, "weight", None), getattr(resolved, "input_tensors", None))
            specs.append(per)
        return path, AutoSmoothQuantStep(groups, list(layers), specs, loss)
