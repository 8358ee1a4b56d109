"""GPTQ as a layer step of the layerwise runner, and the public ``GptqProcessor``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from quark.torch.algorithm.gptq.columns import clear_graph_cache
from quark.torch.algorithm.gptq.math import (
    GptqResult,
    accumulate_cross,
    accumulate_hessian,
    accumulate_hessian_sum,
    float_target_weight,
    gptq_quantize,
    gptq_quantize_stacked,
    hessian_from_sum,
    stackable,
)
from quark.torch.algorithm.kernels import kernels_apply, start_warmup
from quark.torch.algorithm.kernels.warmup import KernelWarmup, finished, specialised_size
from quark.torch.algorithm.utils.model_info import sequential_groups
from quark.torch.algorithm.utils.processor import AlgorithmProcessor
from quark.torch.algorithm.utils.quant import ALL_QSCHEMES, ALL_WEIGHT_DTYPES, WeightGrid, weight_grid_from_spec
from quark.torch.algorithm.utils.specs import refresh_weight_qparams, set_weight_qparams, weight_spec_for
from quark.torch.algorithm.utils.tokens import capped_tokens, token_weights
from quark.torch.quantization.calibration import distributed
from quark.torch.quantization.calibration.layerwise import (
    ModelBackup,
    collecting,
    find_decoder_layers,
    float_linears,
    forward_until_seen,
    run_layerwise,
)
from quark.torch.quantization.config.type import QSchemeType

logger = logging.getLogger(__name__)

GPTQ_QSCHEMES = ALL_QSCHEMES


def _linears(layer: nn.Module, names: Sequence[str] | None, owner: str) -> dict[str, nn.Linear]:
    if not names:
        return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    found: dict[str, nn.Linear] = {}
    for n in names:
        try:
            m = layer.get_submodule(n)
        except AttributeError:
            raise ValueError(f"{owner}.inside_layer_modules: {n!r} names no module of the decoder layer") from None
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{owner}.inside_layer_modules: {n!r} is a {type(m).__name__}, not nn.Linear")
        found[n] = m
    return found


class GptqStep:
    """Per-layer GPTQ: Hessians from the layer's inputs, then column-wise quantization.

    ``grids[i][name]`` is the integer grid of linear ``name`` in decoder layer ``i``; linears
    without a grid (excluded) are left alone. With ``true_sequential`` the linears are quantized in
    groups that share an input, in execution order, each group's Hessians collected after the
    previous groups were quantized.
    """

    def __init__(self, cfg: Any, grids: list[dict[str, WeightGrid]], prefix: str,
                 first_layer: nn.Module | None = None) -> None:
        self.cfg = cfg
        self.grids = grids
        self.prefix = prefix
        self._first_layer = first_layer
        self._warmup: KernelWarmup | None = None
        self.hessians: dict[str, tuple[torch.Tensor | None, int]] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self._only: set[str] | None = None
        self.uses_float_inputs = bool(getattr(cfg, "match_float_outputs", False))
        self._reference: nn.Module | None = None
        self._reference_inputs: list[tuple[tuple, dict]] = []
        # The last accumulation: (input tensor, the Hessian entry before it, the entry after it). A linear
        # fed the same tensor from the same state (q/k/v, gate/up) takes the entry after it as is.
        self._last: tuple[torch.Tensor, tuple | None, tuple] | None = None
        # Linears of the first true-sequential group, per decoder layer class (known after its first layer).
        self._first_group: dict[type, list[str]] = {}

    def prepare(self, device: torch.device | str) -> None:
        """Start compiling the Triton kernels the first layer's solves launch (:mod:`...kernels.warmup`), on a GPU
        whose kernels apply."""
        first = self._first_layer
        if first is not None and self.grids:
            self._warmup = start_warmup(device, "GPTQ", lambda on: _warmup_calls(first, self.grids[0],
                                                                                  self._options("warm-up", True), on))

    def _options(self, name: str, scratch: bool) -> dict[str, Any]:
        """``gptq_quantize``'s keyword arguments from the config."""
        return dict(damp_percent=float(getattr(self.cfg, "damp_percent", 0.01)),
                    desc_act=bool(getattr(self.cfg, "desc_act", True)),
                    static_groups=bool(getattr(self.cfg, "static_groups", True)), name=name,
                    clip_steps=int(getattr(self.cfg, "clip_search_steps", 0) or 0), scratch_hessian=scratch)

    @property
    def collects_targets_only(self) -> bool:
        """The runner's pass may stop each call once the targets ran (not for the paired statistics, which
        run the layer and its float copy themselves)."""
        return not self.uses_float_inputs

    def set_float_reference(self, reference: nn.Module | None, inputs: list[tuple[tuple, dict]]) -> None:
        """The runner's float copy of the current layer and its float-model inputs (or None)."""
        self._reference, self._reference_inputs = reference, inputs

    def targets(self, layer: nn.Module, index: int) -> dict[str, nn.Module]:
        if self._reference is not None and self._only is None:
            return {}  # apply() collects paired statistics itself; the runner's pass would be discarded
        if self._only is not None:
            names = self._only
        else:
            # With true_sequential only the first group's Hessians come from this pass; apply()
            # collects each later group again after the groups before it are quantized.
            first = self._first_group.get(type(layer))
            if first is None and bool(getattr(self.cfg, "true_sequential", True)):
                # the first layer of its class: apply() learns the groups and collects each one itself (the
                # Hessians of every linear at once would hold down_proj's beside the layer's activations)
                return {}
            names = set(self.grids[index]) if first is None else set(first) & set(self.grids[index])
        return {n: layer.get_submodule(n) for n in names}

    def forget_layer(self) -> None:
        """Drop the current layer's statistics (the runner retries it after running out of memory)."""
        self.hessians.clear()
        self.cross.clear()
        self._last = None
        self._only = None

    def collect(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0]
        before = self.hessians.get(name)
        if self._last is not None and self._last[0] is x and self._last[1] is before:
            self.hessians[name] = self._last[2]  # same input, same state: the same result
            return
        h, count = before if before is not None else (None, 0)
        if h is not None and any(other is before for key, other in self.hessians.items() if key != name):
            h = h.clone()  # shared with a linear that has not seen this input yet
        # a float64 sum divided once at the end: the same Hessian however the tokens are split over calls or ranks
        after = accumulate_hessian_sum(h, count, capped_tokens(x))
        self.hessians[name] = after
        self._last = (x, before, after)

    def reduce(self, layer: nn.Module, index: int, names: Sequence[str] | None = None) -> None:
        """Data-parallel ranks: every Hessian (and cross term) becomes the mean over all the ranks' tokens.

        The float64 sums of ``x xᵀ`` are summed (exact but for float64 roundings); the float32 running
        means of ``match_float_outputs`` become ``sum_r H_r n_r / sum_r n_r``, summed in float64. A
        Hessian shared by several linears (q/k/v) is reduced once. Nothing happens in one process.
        Called by the runner after its collecting pass and here after each later collection (``names``:
        the linears just collected; default all).
        """
        if not distributed.active():
            return
        reduced: dict[int, tuple[torch.Tensor, int]] = {}
        for name in sorted(self.hessians if names is None else set(names) & set(self.hessians)):
            entry = self.hessians[name]
            h, count = entry
            if h is None:
                continue
            if id(entry) not in reduced:
                what = f"{self.prefix}.{index}.{name}"
                total = torch.tensor([float(count)], dtype=torch.float64)
                distributed.all_reduce_(total, "sum", f"GPTQ {what}: token count")
                if h.dtype == torch.float64:  # a sum (collect)
                    reduced[id(entry)] = (_rank_sum(h, what), int(total))
                else:  # running means (match_float_outputs), with their cross terms
                    cross = self.cross.get(name)
                    if cross is not None:
                        self.cross[name] = _rank_mean(cross, count, int(total), what)
                    reduced[id(entry)] = (_rank_mean(h, count, int(total), what), int(total))
            self.hessians[name] = reduced[id(entry)]
        self._last = None

    def _quantize_group(self, layer: nn.Module, index: int, names: Sequence[str]) -> None:
        """Quantize ``names``; linears that share one Hessian and one row-wise grid go in one call.

        Data-parallel ranks split such a call by linear (``distributed.owners_by_rows``): each rank solves its
        linears (GPTQ treats rows independently, so each result is the one the whole call gives) and
        broadcasts them to the others.
        """
        batches: dict[tuple, list[str]] = {}
        for n in names:
            entry, grid = self.hessians.get(n), self.grids[index][n]
            if entry is None or n in self.cross or not stackable(grid):
                batches[(n,)] = [n]
            else:
                batches.setdefault((id(entry), grid), []).append(n)
        entry = None  # no reference to a Hessian sum outlives its solve
        for batch in batches.values():
            modules = [layer.get_submodule(n) for n in batch]
            if len(batch) > 1 and distributed.active():
                owners = distributed.owners_by_rows([m.out_features for m in modules], distributed.world_size())
                mine = [n for n, owner in zip(batch, owners) if owner == distributed.rank()]
                results = self._solve(layer, index, batch, mine)
                results = self._share(index, batch, modules, owners, results)
            else:
                with record_function("gptq.solve"):
                    results = self._solve(layer, index, batch, batch)
            grid = self.grids[index][batch[0]]
            for module, n in zip(modules, batch):
                res = results[n]
                module.weight.data.copy_(res.weight)
                if not grid.is_block:  # block formats derive their exponents from the weight itself
                    set_weight_qparams(module, res.scale, res.zero_point, res.scale2)

    def _solve(self, layer: nn.Module, index: int, names: list[str], solve: list[str]) -> dict[str, GptqResult]:
        """GPTQ results of the linears ``solve`` among ``names`` (one, or several sharing a Hessian entry and a
        stackable grid); the Hessian entries of all ``names`` are consumed."""
        entries = [self.hessians.pop(n, (None, 0)) for n in names]
        h, count = entries[0]
        full = {n: f"{self.prefix}.{index}.{n}" for n in names}
        if h is None:
            raise RuntimeError(f"GPTQ {full[names[0]]}: no inputs reached this linear")
        self._last = None  # it may hold this sum and the last input
        del entries  # the float64 sum goes once the Hessian is taken (unless a linear left to solve shares it)
        if not solve:
            return {}
        scratch = h.dtype == torch.float64  # then the float32 Hessian below is this call's own
        if scratch:  # collect()'s sums; the paired statistics are float32 running means
            h = hessian_from_sum(h, count)
        grid = self.grids[index][names[0]]
        options = self._options(" + ".join(full[n] for n in solve), scratch)
        damp = options["damp_percent"]
        finished(self._warmup)
        self._warmup = None
        modules = [layer.get_submodule(n) for n in solve]
        if len(solve) > 1:
            results = gptq_quantize_stacked([m.weight.data for m in modules], h, grid, **options)
        else:
            weight = modules[0].weight.data
            cross = self.cross.pop(solve[0], None)
            if cross is not None:
                weight = float_target_weight(weight, h, cross, damp)
            results = [gptq_quantize(weight, h, grid, **options)]
        del h
        for res, n in zip(results, solve):
            logger.debug("GPTQ %s: loss %.4g (damp %g)", full[n], res.loss, res.damp)
        return dict(zip(solve, results))

    def _share(self, index: int, names: list[str], modules: list[nn.Module], owners: list[int],
               results: dict[str, GptqResult]) -> dict[str, GptqResult]:
        """Every linear's result on every rank, broadcast from the rank that solved it (stackable grids: one
        weight and, but for block formats, the per-row or per-group scales and zero points)."""
        grid = self.grids[index][names[0]]
        shared: dict[str, GptqResult] = {}
        for n, module, owner in zip(names, modules, owners):
            weight = module.weight.data
            what = f"GPTQ {self.prefix}.{index}.{n}: result"
            res = results.get(n)
            if res is None:
                work = torch.float64 if weight.dtype == torch.float64 else torch.float32
                shape = (weight.shape[0],) if grid.qscheme == QSchemeType.per_channel else (
                    weight.shape[0], weight.shape[1] // grid.group_size)
                empty = torch.zeros(shape if not grid.is_block else (0,), dtype=work, device=weight.device)
                res = GptqResult(torch.empty_like(weight), empty, empty.clone(), 0.0, 0.0)
            distributed.broadcast_(res.weight, owner, what)
            if not grid.is_block:
                distributed.broadcast_(res.scale, owner, what)
                distributed.broadcast_(res.zero_point, owner, what)
            shared[n] = res
        return shared

    def _collect_paired(self, layer: nn.Module, group: Sequence[str], inputs: list[tuple[tuple, dict]]) -> None:
        """Hessians and float-input cross terms of ``group``, batch by batch from both streams."""
        if self._reference is None:
            raise RuntimeError("GPTQ match_float_outputs: the runner gave no float copy of the layer")
        float_x: dict[str, torch.Tensor] = {}
        handles = []

        def grab(name: str) -> Any:
            def hook(mod: nn.Module, args: tuple, output: Any) -> None:
                float_x[name] = args[0]
            return hook

        def pair(name: str) -> Any:
            def hook(mod: nn.Module, args: tuple, output: Any) -> None:
                h, count = self.hessians.get(name, (None, 0))
                weights = token_weights(args[0])
                x = args[0].reshape(-1, args[0].shape[-1])
                xf = float_x.pop(name).reshape(-1, x.shape[-1])
                if weights is not None:
                    x, xf = x * weights, xf * weights
                self.cross[name] = accumulate_cross(self.cross.get(name), count, xf, x)
                self.hessians[name] = accumulate_hessian(h, count, x)
            return hook

        for n in group:
            self.hessians.pop(n, None)
            self.cross.pop(n, None)
            # the float copy's hooks run after its own (pre-hook) online rotation, like the layer's
            handles.append(self._reference.get_submodule(n).register_forward_hook(grab(n)))
            handles.append(layer.get_submodule(n).register_forward_hook(pair(n)))
        try:
            with float_linears(self._reference):
                for (args, kwargs), (fargs, fkwargs) in zip(inputs, self._reference_inputs):
                    self._reference(*fargs, **fkwargs)
                    layer(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def apply(self, layer: nn.Module, index: int, inputs: list[tuple[tuple, dict]]) -> None:
        self._apply(layer, index, inputs)
        # qparams GPTQ did not fix (block formats, linears outside its list) follow the weights as they are now
        refresh_weight_qparams(layer)

    def _apply(self, layer: nn.Module, index: int, inputs: list[tuple[tuple, dict]]) -> None:
        names = list(self.grids[index])
        paired = self._reference is not None
        if not bool(getattr(self.cfg, "true_sequential", True)):
            if paired:
                self._collect_paired(layer, names, inputs)
                self.reduce(layer, index)
            self._quantize_group(layer, index, names)
            self._last = None
            return
        groups = sequential_groups(layer, *inputs[0], names=names)
        missing = set(names) - {n for g in groups for n in g}
        if missing:
            groups.append(sorted(missing))
        if not paired and self._first_group.get(type(layer)) is None and set(names) == set(self.grids[index]):
            self._first_group[type(layer)] = list(groups[0])
            for n in set(self.hessians) - set(groups[0]):  # collected before the groups were known: redone later
                del self.hessians[n]
            self._last = None
        for k, group in enumerate(groups):
            if paired:
                self._collect_paired(layer, group, inputs)
                self.reduce(layer, index, group)
            elif k > 0 or any(n not in self.hessians for n in group):
                for n in group:
                    self.hessians.pop(n, None)
                self._only = set(group)
                try:
                    with collecting(layer, self, index), torch.no_grad(), record_function("gptq.recollect"):
                        forward_until_seen(layer, inputs, [layer.get_submodule(n) for n in group])
                finally:
                    self._only = None
                self.reduce(layer, index, group)
            self._quantize_group(layer, index, group)
        self._last = None


def _warmup_calls(layer: nn.Module, grids: dict[str, WeightGrid], options: dict[str, Any],
                  device: torch.device) -> list[Callable[[], object]]:
    """GPTQ of tiny weights with the specialisation of ``layer``'s (rows, and groups or column blocks), one per
    distinct (grid, shape class): the range search and column kernels compile as its solves will launch them.
    ``tests/algorithm/test_kernel_warmup.py`` checks on a GPU that the solves then compile nothing."""
    calls: dict[tuple, Callable[[], object]] = {}
    probe = torch.empty(0, device=device)
    for name, grid in grids.items():
        out, cols = layer.get_submodule(name).weight.shape
        if not kernels_apply(probe, grid):
            continue
        if grid.qscheme == QSchemeType.per_group:
            if cols % grid.group_size:
                continue
            shape = (specialised_size(out), specialised_size(cols // grid.group_size) * grid.group_size)
        else:  # the column kernel's blocks of 128
            shape = (specialised_size(out), 256)
        calls.setdefault((grid, shape), partial(_warm_solve, shape, grid, options, device))
    return list(calls.values())


def _warm_solve(shape: tuple[int, int], grid: WeightGrid, options: dict[str, Any], device: torch.device) -> None:
    out, cols = shape
    weight = torch.linspace(-1, 1, out * cols, device=device).reshape(out, cols)
    gptq_quantize(weight, torch.eye(cols, device=device), grid, **options)


#: Rows of a Hessian reduced at a time over data-parallel ranks (bounds the float64 copy on the device).
REDUCE_ROWS = 1024


def _rank_sum(total: torch.Tensor, what: str) -> torch.Tensor:
    """``total`` summed over every rank in place, ``REDUCE_ROWS`` rows at a time."""
    for r0 in range(0, total.shape[0], REDUCE_ROWS):
        distributed.all_reduce_(total[r0:r0 + REDUCE_ROWS], "sum", f"GPTQ {what}: statistics")
    return total


def _rank_mean(mean: torch.Tensor, count: int, total: int, what: str) -> torch.Tensor:
    """The mean over every rank's tokens from this rank's running ``mean`` of ``count`` tokens, in place:
    ``sum_r mean_r count_r / total`` summed in float64, ``REDUCE_ROWS`` rows at a time."""
    for r0 in range(0, mean.shape[0], REDUCE_ROWS):
        rows = mean[r0:r0 + REDUCE_ROWS]
        summed = distributed.all_reduce_(rows.double() * count, "sum", f"GPTQ {what}: statistics")
        rows.copy_(summed / total)
    return mean


class GptqProcessor(AlgorithmProcessor):
    """GPTQ over a whole model: ``GptqProcessor(model, algo_config, data, quant_config=...).apply()``.

    ``quant_config`` (a ``Config``) decides each linear's weight spec through the resolver: integer
    and scaled-float (fp8/fp6/fp4, one or two stages) weights per group, channel or tensor, OCP MX
    and BFP16/MX6/MX9 blocks, checked for every targeted linear before any weight changes. On
    failure the model's weights are restored.
    """

    def build_step(self) -> GptqStep:
        path, layers = find_decoder_layers(self.model, getattr(self.cfg, "model_decoder_layers", None) or None)
        inside = getattr(self.cfg, "inside_layer_modules", None)
        grids: list[dict[str, WeightGrid]] = []
        for i, layer in enumerate(layers):
            per_layer: dict[str, WeightGrid] = {}
            for name, module in _linears(layer, inside, "GPTQConfig").items():
                full = f"{path}.{i}.{name}"
                spec = weight_spec_for(full, module, self.quant_config)
                if spec is None:
                    continue
                per_layer[name] = weight_grid_from_spec(spec, f"GPTQConfig: {full}", module.in_features,
                                                        allowed=GPTQ_QSCHEMES, dtypes=ALL_WEIGHT_DTYPES)
            grids.append(per_layer)
        if not any(grids):
            raise ValueError("GPTQConfig: no linear of the decoder layers has a quantized weight to optimise")
        desc, static = getattr(self.cfg, "desc_act", True), getattr(self.cfg, "static_groups", True)
        for per in grids:
            for g in per.values():
                if desc and not static and g.qscheme.name == "per_group":
                    raise ValueError("GPTQConfig.static_groups=False with desc_act=True is not supported for "
                                     "per_group weights (needs a group index); set static_groups=True")
                if not static and g.qscheme.name == "per_group" and g.scale_dtype is not None:
                    raise ValueError("GPTQConfig.static_groups=False is not supported for a two-stage weight spec "
                                     "(its scale stage's per-tensor scale needs every group's scale before the "
                                     "first column); set static_groups=True")
        return GptqStep(self.cfg, grids, path, first_layer=layers[0] if len(layers) else None)

    def apply(self, backup: ModelBackup | None = None) -> None:
        step = self.build_step()
        try:
            run_layerwise(self.model, self.data, [step], self.device,
                          decoder_path=getattr(self.cfg, "model_decoder_layers", None) or None,
                          backup=backup, desc="GPTQ")
        finally:
            clear_graph_cache()
