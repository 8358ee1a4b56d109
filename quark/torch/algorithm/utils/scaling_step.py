"""What SmoothQuant, AutoSmoothQuant and AWQ share: per-layer scaling groups and their results.

Results are data (:class:`ScaleResult`): the search produces them, :func:`apply_scale_results`
applies them, so they can be saved, reloaded and replayed without calibration.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quark.torch.algorithm.utils.model_info import ScalingGroup, _norm_like, applies_to, submodule
from quark.torch.algorithm.utils.scaling import candidate_slices, find_head_dim, scale_fc_fc, scale_norm_fcs
from quark.torch.algorithm.utils.specs import refresh_weight_qparams
from quark.torch.quantization.calibration import distributed
from quark.torch.quantization.calibration.batching import checked_merge
from quark.torch.quantization.calibration.layerwise import float_linears, layer_output_tensor

logger = logging.getLogger(__name__)


@dataclass
class ScaleResult:
    """Scales found for one group of one decoder layer (``s`` in ``prev_op``'s output space)."""

    layer_index: int
    prev_op: str
    layers: list[str]
    scales: torch.Tensor
    prev_start: int = 0  # first output row of a fused producer that the scales address


@torch.no_grad()
def apply_scale_results(layer: nn.Module, results: Sequence[ScaleResult], owner: str) -> None:
    """Divide each ``prev_op`` by its scales and multiply the group's linears by them."""
    head_dim = find_head_dim(layer)
    for r in results:
        prev = submodule(layer, r.prev_op, f"{owner}.prev_op")
        fcs = [submodule(layer, n, f"{owner}.layers") for n in r.layers]
        if isinstance(prev, nn.Linear):
            scale_fc_fc(prev, fcs, r.scales, head_dim, start=r.prev_start)
        elif _norm_like(prev):
            scale_norm_fcs(prev, fcs, r.scales)
        else:
            raise ValueError(f"{owner}: prev_op {r.prev_op!r} is a {type(prev).__name__}; only a norm "
                             "(1-D weight) or an nn.Linear can absorb scales")


#: Calls of at most this many tokens are merged for the searches on a CPU too (where calibration
#: calls are otherwise kept as given): a search replays them for every candidate, and a small
#: forward costs mostly the fixed cost of its ops (on a CPU shared with other processes, every
#: multi-threaded op waits for a time slice). Tiny Llama, AWQ, 4 x 32 tokens, 2 threads: see
#: ``bench/bench_awq_cpu.py``. Larger calls stay as given (a merged SmolLM2 GPTQ forward of 512-token
#: calls measured slower, ``calibration.batching.MERGE_ON_CPU``).
SMALL_CALL_TOKENS = 256


def call_tokens(call: tuple[tuple, dict]) -> int:
    """Batch × sequence of a call's first tensor argument (0 when it has none of two dimensions)."""
    args, kwargs = call
    first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
    return int(first.shape[0] * first.shape[1]) if first is not None and first.dim() >= 2 else 0


class ScalingStep:
    """Base of the scaling algorithms: hooks the groups' ``inp`` and ``module2inspect`` modules.

    ``active[i]`` lists the groups that apply to decoder layer ``i`` (their ``condition`` holds).
    Subclasses implement ``search(layer, index, inputs) -> list[ScaleResult]``.
    """

    owner = "scaling"
    #: True for a search whose candidates quantize activations with parameters taken from each
    #: call's own tensor: it must see the calibration calls as recorded, never merged.
    keeps_calls_as_recorded = False

    def __init__(self, groups: Sequence[ScalingGroup], layers: Sequence[nn.Module]) -> None:
        self.groups = list(groups)
        self._skipped: set[str] = set()
        self.active: list[list[ScalingGroup]] = [
            [g for g in self.groups if applies_to(layer, g) and not self._rotated_input(g, layer, i)]
            for i, layer in enumerate(layers)
        ]
        self.inputs: dict[str, list[tuple[tuple, dict]]] = {}
        self.results: list[ScaleResult] = []
        self._merge_ok: dict[str, bool] = {}

    def targets(self, layer: nn.Module, index: int) -> dict[str, nn.Module]:
        names: dict[str, nn.Module] = {}
        for g in self.active[index]:
            names[g.inp] = submodule(layer, g.inp, f"{self.owner}.inp")
            if g.module2inspect:
                names[g.module2inspect] = submodule(layer, g.module2inspect, f"{self.owner}.module2inspect")
        return names

    def _rotated_input(self, g: ScalingGroup, layer: nn.Module, index: int) -> bool:
        """True (and logged) when a consumer rotates its input online: no channel scale passes through."""
        rotated = [n for n in g.layers if getattr(submodule(layer, n, f"{self.owner}.layers"), "input_rotation", None)
                   is not None]
        if rotated and g.prev_op not in self._skipped:
            self._skipped.add(g.prev_op)
            logger.warning("%s: %s rotate%s its input online (QuaRot R4 Hadamard), so the %s -> %s "
                           "scaling cannot pass through it; that group is skipped (first seen in decoder "
                           "layer %d)", self.owner, ", ".join(rotated), "" if len(rotated) > 1 else "s",
                           g.prev_op, ", ".join(g.layers), index)
        return bool(rotated)

    def collect(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.inputs.setdefault(name, []).append((args, kwargs))

    def forget_layer(self) -> None:
        """Drop what was collected for the current layer (the runner retries it after running out of memory)."""
        self.inputs.clear()

    def group_input(self, g: ScalingGroup) -> torch.Tensor:
        xs = [a[0] for a, _ in self.inputs[g.inp]]
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs], 0)

    def group_abs_max(self, g: ScalingGroup) -> torch.Tensor:
        """``max |x|`` per input channel of the group over the calibration tokens (of every data-parallel
        rank: exact in any order)."""
        return distributed.all_reduce_(self.group_input(g).abs().amax(0), "max", f"{self.owner}: {g.inp} input max")

    def inspect_calls(self, layer: nn.Module, g: ScalingGroup) -> tuple[nn.Module, list[tuple[tuple, dict]]]:
        """The module whose output the search compares, and its recorded calls (merged into batches)."""
        if g.module2inspect:
            m = submodule(layer, g.module2inspect, f"{self.owner}.module2inspect")
            calls = [(a, k if (g.has_kwargs or not a) else {}) for a, k in self.inputs[g.module2inspect]]
            return m, self._batched(g.module2inspect, m, calls)
        m = submodule(layer, g.layers[0], f"{self.owner}.layers")
        return m, self._batched(g.layers[0], m, self.inputs[g.inp])

    def _batched(self, name: str, module: nn.Module, calls: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
        """``calls`` merged along the batch (:mod:`quark.torch.quantization.calibration.batching`).

        The first time a module name is seen, the first merged call is checked against the calls
        it replaces; a module that mixes samples (or a merge that changes the result) keeps its
        recorded calls from then on.
        """
        if self.keeps_calls_as_recorded:
            return calls
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        if device.type == "cpu" and all(call_tokens(call) <= SMALL_CALL_TOKENS for call in calls):
            # checked_merge's policy is per device type: small calls merge on a CPU as on an accelerator
            device = torch.device("meta")
        runs, verdict = checked_merge(calls, lambda call: self.run(module, [call])[0], self._merge_ok.get(name),
                                      device, f"{self.owner}: {name}")
        if verdict is not None:
            self._merge_ok[name] = verdict
        return runs

    @staticmethod
    def run(module: nn.Module, calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
        return [layer_output_tensor(module(*a, **k)) for a, k in calls]

    def search(self, layer: nn.Module, index: int, inputs: list) -> list[ScaleResult]:
        raise NotImplementedError

    def apply(self, layer: nn.Module, index: int, inputs: list[tuple[tuple, dict]]) -> None:
        try:
            results = self.search(layer, index, inputs)
        finally:
            self.inputs.clear()
        for r in results:
            if not torch.isfinite(r.scales).all():
                raise RuntimeError(f"{self.owner}: non-finite scales for {r.prev_op} in decoder layer {index}")
        apply_scale_results(layer, results, self.owner)
        self.after_scaling(layer, index, results)
        refresh_weight_qparams(layer)
        self.results.extend(results)

    def after_scaling(self, layer: nn.Module, index: int, results: list[ScaleResult]) -> None:
        """Hook for work after the scales are applied (AWQ's clipping); nothing by default."""


@torch.no_grad()
def producer_slice(layer: nn.Module, g: ScalingGroup, inputs: list[tuple[tuple, dict]], owner: str) -> tuple[int, int]:
    """``(start, length)``: the output rows of ``g.prev_op`` that ``g.layers`` read.

    All of them for a norm or a plain producer. A fused producer (a ``qkv_proj`` feeding
    ``o_proj``, a ``gate_up_proj`` feeding ``down_proj``) writes more channels than the consumers
    read, and shapes alone cannot tell which (a q+k+v split with two query heads per kv head has
    the same sizes as gate+up). Each candidate slice (the tail first, then the head) is scaled by
    random factors, with the consumers' columns scaled back; the slice that leaves the decoder
    layer's output unchanged is the one.
    """
    prev = submodule(layer, g.prev_op, f"{owner}.prev_op")
    fcs = [submodule(layer, n, f"{owner}.layers") for n in g.layers]
    if not isinstance(prev, nn.Linear) or prev.out_features <= fcs[0].in_features:
        return 0, _n_out(prev)
    head_dim = find_head_dim(layer)
    n_prev, n_in = prev.out_features, fcs[0].in_features
    args, kwargs = inputs[0]
    lengths = [m for m in range(n_in, 0, -1)
               if n_in % m == 0 and (m == n_in or (head_dim is not None and m % head_dim == 0))]
    params = [prev.weight, *([prev.bias] if prev.bias is not None else []), *(fc.weight for fc in fcs)]
    saved = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(0)
    with float_linears(layer):
        base = layer_output_tensor(layer(*args, **kwargs)).float()
        for start, m in candidate_slices(n_prev, lengths):
            s = torch.rand(m, generator=generator) + 0.5
            try:
                scale_fc_fc(prev, fcs, s, head_dim, start=start)
                out = layer_output_tensor(layer(*args, **kwargs)).float()
            finally:
                for p, v in zip(params, saved):
                    p.copy_(v)
            if (out - base).norm() <= 1e-4 * base.norm():
                return start, m
    raise ValueError(f"{owner}: no slice of {g.prev_op}'s {n_prev} outputs feeds {g.layers} ({n_in} inputs) "
                     "unchanged; check the scaling group")


def _n_out(prev: nn.Module) -> int:
    return prev.out_features if isinstance(prev, nn.Linear) else prev.weight.numel()


def loss_fn(name: str) -> Any:
    """``"MSE"`` or ``"MAE"`` between two lists of tensors."""
    key = str(name).upper()
    if key not in ("MSE", "MAE"):
        raise ValueError(f"AutoSmoothQuantConfig.compute_scale_loss={name!r} is not one of: MSE, MAE")

    def f(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        total = 0.0
        count = 0
        for x, y in zip(a, b):
            d = (x.float() - y.float())
            total += float((d.pow(2) if key == "MSE" else d.abs()).sum())
            count += d.numel()
        if distributed.active():  # data-parallel ranks: the loss over every rank's calls
            both = distributed.all_reduce_(torch.tensor([total, float(count)], dtype=torch.float64), "sum",
                                           f"{name} search loss")
            total, count = float(both[0]), int(both[1])
        return total / max(count, 1)

    return f
