"""Activation-aware Weight Quantization (Lin et al., 2023) on the layerwise runner.

Per scaling group: a 20-point grid over ``alpha``, ``s = mean|x|^alpha`` normalised by
``sqrt(max(s) * min(s))``; each candidate is judged by the MSE of ``module2inspect``'s output
when the group's weights are replaced by ``Q(clip(W * s)) / s``. The clipping search shrinks each
weight group's range (down to 55%) to minimise that linear's output error over every calibration
token (through each group's input covariance); the reference judges the candidates unclipped and
clips once after (``AWQConfig.clip_in_scale_search=False``). Every quantized linear is clipped,
q_proj and k_proj included (AutoAWQ leaves them out; here that measured worse, SmolLM2-135M int4 g64
test 26.56 -> 27.10, validation 22.99 -> 23.64). Results are data
(:class:`ScaleResult`, plus the clipped weights left in the module).

Every weight format is searched with its own fake quantization (:mod:`quark.torch.algorithm.utils.quant`).
Block formats (OCP MX, BFP16/MX6/MX9) judge the scale candidates unclipped and clip once after,
as the reference does: there clipping only picks a block's power-of-two exponent (and saturates
the values above the clip), a coarse choice that, made for every candidate, steers the scale
search by exponent flips rather than by the scales (tiny Llama, MXFP4, logit MSE: RTN 0.0566,
clipped candidates 0.0625, unclipped candidates then clipped 0.0481, never clipped 0.0485).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from quark.torch.algorithm.awq.inputs import GroupInputStats, group_input_stats, output_error
from quark.torch.algorithm.kernels import (
    kernel_group_size,
    kernel_or_twin,
    kernels_apply,
    start_warmup,
    triton_applies,
)
from quark.torch.algorithm.kernels.warmup import KernelWarmup, finished, specialised_size
from quark.torch.algorithm.utils.model_info import (
    ScalingGroup,
    applies_to,
    groups_from_config,
    submodule,
    validate_groups,
)
from quark.torch.algorithm.utils.processor import AlgorithmProcessor
from quark.torch.algorithm.utils.quant import (
    ALL_QSCHEMES,
    ALL_WEIGHT_DTYPES,
    WeightGrid,
    fake_quant_weight,
    fake_quant_with,
    minmax_qparams,
    second_stage_scales,
    stage_two_scale,
    weight_grid_from_spec,
)
from quark.torch.algorithm.utils.scaling import expand_scales, find_head_dim, reduce_to_prev
from quark.torch.algorithm.utils.scaling_step import ScaleResult, ScalingStep, producer_slice
from quark.torch.algorithm.utils.specs import weight_spec_for
from quark.torch.quantization.calibration import distributed
from quark.torch.quantization.calibration.distributed import all_reduce_
from quark.torch.quantization.calibration.layerwise import ModelBackup, find_decoder_layers, run_layerwise
from quark.torch.quantization.config.type import QSchemeType, ScaleType

logger = logging.getLogger(__name__)

N_GRID = 20
CLIP_STEPS = 10  # shrink ratios 1.0, 0.95, ..., 0.55


class AwqStep(ScalingStep):
    """Per-layer AWQ: scale search (each candidate clipped as it would be, except for block formats),
    scale application, clipping."""

    owner = "AWQConfig"

    def __init__(self, groups: Sequence[ScalingGroup], layers: Sequence[nn.Module],
                 grids: list[dict[str, WeightGrid]], clip_in_scale_search: bool = True) -> None:
        super().__init__(groups, layers)
        self.grids = grids
        self.clip_in_scale_search = clip_in_scale_search
        self._clip_covariances: dict[str, torch.Tensor] = {}
        self._first_layer = layers[0] if layers else None
        self._warmup: KernelWarmup | None = None

    def prepare(self, device: torch.device | str) -> None:
        """Start compiling the Triton kernels the first layer's search launches (:mod:`...kernels.warmup`), on a
        GPU whose kernels apply."""
        first = self._first_layer
        if first is not None and self.active:
            self._warmup = start_warmup(device, "AWQ", lambda on: _warmup_calls(self, first, self.active[0],
                                                                                 self.grids[0], on))

    @torch.no_grad()
    def search(self, layer: nn.Module, index: int, inputs: list) -> list[ScaleResult]:
        head_dim = find_head_dim(layer)
        grids = self.grids[index]
        results = []
        self._clip_covariances = {}
        groups = [(g, [n for n in g.layers if n in grids]) for g in self.active[index]]
        # Groups judged on a linear's output need only statistics of their inputs (every group's inputs
        # were recorded before any scale changes), so those come first and their inputs go at once:
        # down_proj's are the largest a layer records.
        with record_function("awq.input_stats"):
            stats = {k: self._input_stats(g, quantized, grids) for k, (g, quantized) in enumerate(groups)
                     if quantized and not g.module2inspect}
        self._drop_inputs_except({name for k, (g, _) in enumerate(groups) if k not in stats
                                  for name in (g.inp, g.module2inspect) if name})
        for k, (g, quantized) in enumerate(groups):
            if quantized:
                if k not in stats:
                    with record_function("awq.input_stats"):
                        stats[k] = self._input_stats(g, quantized, grids)
                with record_function("awq.search_group"):
                    results.append(self._search_group(layer, index, g, quantized, inputs, head_dim, stats.pop(k)))
            self._drop_inputs_except({name for other, _ in groups[k + 1:] for name in (other.inp, other.module2inspect)
                                      if name})
        return results

    def _input_stats(self, g: ScalingGroup, quantized: list[str], grids: dict[str, WeightGrid]) -> GroupInputStats:
        # a group without module2inspect is judged on its first linear's output: a linear function of the
        # input, whose error for a weight change E is tr(E C Eᵀ) with C the input's second moment
        return group_input_stats([a[0] for a, _ in self.inputs[g.inp]], {grids[n].group_size for n in quantized},
                                 full=not g.module2inspect and g.layers[0] in quantized).reduce()

    def _drop_inputs_except(self, keep: set[str]) -> None:
        for name in [n for n in self.inputs if n not in keep]:
            del self.inputs[name]

    def _search_group(self, layer: nn.Module, index: int, g: ScalingGroup, quantized: list[str], inputs: list,
                      head_dim: int | None, stats: GroupInputStats) -> ScaleResult:
        """The best of the ``N_GRID`` scale candidates of group ``g``; notes its clipping covariances."""
        grids = self.grids[index]
        start, n_prev = producer_slice(layer, g, inputs, self.owner)
        linear_only = not g.module2inspect
        cols = stats.abs_sum.numel()
        x_mean = reduce_to_prev(stats.mean_abs(), n_prev, head_dim, how="mean")
        # the group input's covariance per group size, rescaled for each candidate
        covariances = {size: stats.covariance(size) for size in stats.block_cov}
        fcs = {n: submodule(layer, n, f"{self.owner}.layers") for n in quantized}
        saved = {n: fc.weight.data.clone() for n, fc in fcs.items()}
        dtype = saved[quantized[0]].dtype
        candidates = []
        for r in range(N_GRID):
            s = x_mean.pow(r / N_GRID).clamp(min=1e-4)
            candidates.append(s / (s.max() * s.min()).sqrt())
        # the group's linears share their input (x) and so its scales
        expanded = torch.stack([expand_scales(s, cols, head_dim) for s in candidates]).to(dtype)
        chunk = _candidate_chunk([saved[n] for n in quantized])
        # per candidate: (sum of squared output errors, their count) over this process's tokens; kept where the
        # errors are computed, so judging the candidates waits for the device once, not once per candidate
        losses = torch.zeros(N_GRID, 2, dtype=torch.float64, device=saved[quantized[0]].device)
        if linear_only:
            judged = g.layers[0]
            per_token = fcs[judged].out_features if judged in fcs else 0
        else:
            module, calls = self.inspect_calls(layer, g)
            reference = self.run(module, calls)
        finished(self._warmup)
        self._warmup = None
        for r0, weights in self._candidate_batches(saved, quantized, expanded, chunk, covariances, grids):
            for k in range(next(iter(weights.values())).shape[0]):
                if linear_only:
                    if stats.full_cov is not None:
                        delta = weights[judged][k].float() - saved[judged].float()
                        losses[r0 + k, 0] = output_error(delta, stats.full_cov, dtype)
                    losses[r0 + k, 1] = stats.local_tokens * per_token
                else:
                    for n, fc in fcs.items():
                        fc.weight.data.copy_(weights[n][k])
                    losses[r0 + k, 0], losses[r0 + k, 1] = _squared_error(self.run, module, calls, reference)
        for n, fc in fcs.items():
            fc.weight.data.copy_(saved[n])
        losses = all_reduce_(losses.cpu())  # every rank's tokens count
        mse = torch.nan_to_num(losses[:, 0] / losses[:, 1].clamp(min=1), nan=float("inf"))
        if not bool(torch.isfinite(mse).any()):
            raise RuntimeError(f"AWQ: no finite loss for group {g.layers} of decoder layer {index} (NaN?)")
        best = candidates[int(mse.argmin())].clone()  # the first of equal minima
        final = _scaled_covariances(covariances, expand_scales(best, cols, head_dim))
        for n in quantized:
            self._clip_covariances[n] = final[grids[n].group_size]
        return ScaleResult(index, g.prev_op, list(g.layers), best.cpu(), prev_start=start)

    def _candidate_batches(self, saved: dict[str, torch.Tensor], quantized: list[str], expanded: torch.Tensor,
                           chunk: int, covariances: dict[int, torch.Tensor], grids: dict[str, WeightGrid],
                           ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(first candidate, {linear: [k, out, in] candidate weights})`` per batch of ``chunk`` candidates.

        Data-parallel ranks take the batches in turns: in each round every rank computes one batch (the
        batches are those of one process, so each is computed as one process would) and broadcasts it;
        every rank then judges all of them on its own tokens.
        """
        starts = list(range(0, N_GRID, chunk))
        ranks, me = distributed.world_size(), distributed.rank()
        for first in range(0, len(starts), ranks):
            owned = starts[first:first + ranks]
            mine: dict[str, torch.Tensor] = {}
            if me < len(owned):
                se = expanded[owned[me]:owned[me] + chunk]
                with record_function("awq.candidate_weights"):
                    per_candidate: dict[int, torch.Tensor] = {}  # the group's linears share their input
                    mine = {n: self._candidate_weights(saved[n], se, covariances, per_candidate, grids[n])
                            for n in quantized}
            for owner, r0 in enumerate(owned):
                if ranks == 1:
                    yield r0, mine
                    continue
                k = min(chunk, N_GRID - r0)
                batch = mine if owner == me else {
                    n: torch.empty((k, *saved[n].shape), dtype=saved[n].dtype, device=saved[n].device)
                    for n in quantized}
                for n in quantized:
                    if batch[n].dtype != saved[n].dtype:  # the receivers allocated the weight's dtype
                        raise RuntimeError(f"AWQ: candidate weights of {n} are {batch[n].dtype}, the weight "
                                           f"{saved[n].dtype}")
                    distributed.broadcast_(batch[n], owner, "AWQ: candidate weights")
                yield r0, batch

    def _candidate_weights(self, w: torch.Tensor, se: torch.Tensor, covariances: dict[int, torch.Tensor],
                           per_candidate: dict[int, torch.Tensor], grid: WeightGrid) -> torch.Tensor:
        """``[candidates, out, in]``: ``Q(clip(w * s)) / s`` for each row ``s`` of ``se`` (one batch).
        ``per_candidate`` keeps the batch's candidate covariances by group size for the group's other linears."""
        clip = self.clip_in_scale_search and not grid.is_block
        gs = grid.group_size
        if clip and _fused_candidates_apply(w, grid):
            if gs not in per_candidate:
                per_candidate[gs] = _candidate_covariances(covariances[gs], se)
            covs = per_candidate[gs]
            return kernel_or_twin("awq_candidate_weights", lambda: _fused_candidate_weights(w, se, covs, grid),
                                  lambda: _candidate_weights_torch(w[None] * se[:, None, :], se, covariances[gs],
                                                                   grid))
        return _candidate_weights_torch(w[None] * se[:, None, :], se, covariances[gs] if clip else None, grid)

    @torch.no_grad()
    def after_scaling(self, layer: nn.Module, index: int, results: list[ScaleResult]) -> None:
        """Clip every quantized linear of the layer (data-parallel ranks split the linears and broadcast)."""
        names = list(self._clip_covariances)
        fcs = [submodule(layer, name, f"{self.owner}.layers") for name in names]
        owners = distributed.owners_by_rows([fc.out_features for fc in fcs], distributed.world_size())
        for name, fc, owner in zip(names, fcs, owners):
            if owner == distributed.rank():
                with record_function("awq.final_clip"):
                    fc.weight.data.copy_(_final_clip(fc.weight.data, self._clip_covariances[name],
                                                     self.grids[index][name]))
            distributed.broadcast_(fc.weight.data, owner, f"AWQ {name} of decoder layer {index}: clipped weight")
        self._clip_covariances = {}


def _warmup_calls(step: AwqStep, layer: nn.Module, groups: Sequence[ScalingGroup], grids: dict[str, WeightGrid],
                  device: torch.device) -> list[Callable[[], object]]:
    """The kernel launches of ``layer``'s search on tiny inputs of the same specialisation, one call per distinct
    kernel variant, so that they compile in parallel: the scale candidates' kernel (also the final clipping's),
    or where it does not apply the clip kernel (the weights' dtype, one covariance per candidate), and the output
    error.
    ``tests/algorithm/test_kernel_warmup.py`` checks on a GPU that the search then compiles nothing."""
    calls: dict[tuple, Callable[[], object]] = {}
    for g in groups:
        for name in (n for n in g.layers if n in grids):
            fc = submodule(layer, name, f"{step.owner}.layers")
            grid, (out, cols), dtype = grids[name], fc.weight.shape, fc.weight.dtype
            gs = grid.group_size
            if cols % gs or not kernel_group_size(gs):
                continue
            rows, groups_ = specialised_size(out), specialised_size(cols // gs)
            probe = torch.empty(1, rows, groups_ * gs, dtype=dtype, device=device)
            if not _clip_kernel_applies(probe, grid):
                continue
            if _fused_candidates_apply(probe, grid):  # the scale candidates and the final clipping
                calls.setdefault(("candidates", dtype, grid, rows, groups_),
                                 partial(_warm_clip_kernels, "candidates", rows, groups_, dtype, grid, device))
                continue
            final = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32  # as clip_search reads it
            calls.setdefault(("clip", final, grid, rows, groups_),
                             partial(_warm_clip_kernels, "clip", rows, groups_, final, grid, device))
        if g.module2inspect:
            dtype = next(submodule(layer, g.module2inspect, f"{step.owner}.module2inspect").parameters()).dtype
            calls.setdefault(("error", dtype), partial(_warm_error, dtype, device))
    return list(calls.values())


def _warm_clip_kernels(kind: str, rows: int, groups: int, dtype: torch.dtype, grid: WeightGrid,
                       device: torch.device) -> None:
    """One launch of the clip kernel as :func:`_kernel_clip` makes it (``clip``), or of the scale candidates' kernel
    as :func:`_fused_candidate_weights` makes it (``candidates``), on ``[2, rows, groups, gs]`` weights."""
    from quark.torch.algorithm.kernels.clip import best_clip_steps

    gs = grid.group_size
    batch = 2
    wg = torch.linspace(-1, 1, batch * rows * groups * gs, device=device).reshape(batch, rows, groups, gs).to(dtype)
    ratios = _clip_ratios(device)
    cov = torch.eye(gs, device=device).expand(groups, gs, gs).contiguous()
    if kind == "candidates":
        _fused_candidate_weights(wg[0].reshape(rows, groups * gs), torch.ones(batch, groups * gs, dtype=dtype,
                                                                             device=device),
                                 cov.expand(batch, *cov.shape), grid)
        return
    lo, hi = (t.float() for t in torch.aminmax(wg, dim=-1))
    max0 = torch.maximum(-lo, hi)
    scale, zp = _clipped_qparams(lo[:, None], hi[:, None], max0[:, None] * ratios[None, :, None, None], grid, None)
    best_clip_steps(wg, max0, scale, zp, ratios, cov.expand(batch, *cov.shape), grid)


def _warm_error(dtype: torch.dtype, device: torch.device) -> None:
    a = torch.zeros(64, 16, dtype=dtype, device=device)  # the outputs' sizes are multiples of 16
    _squared_error_sum(a, a)


def _final_clip(w: torch.Tensor, cov: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """:func:`clip_search` of the scaled weight ``w [out, in]``; where the scale candidates' kernel applies, through
    it (``s`` = 1, the clipped weight written as it is): the same choices, and one kernel fewer to compile."""
    if not _fused_candidates_apply(w, grid):
        return clip_search(w, cov, grid)
    from quark.torch.algorithm.kernels.clip import candidate_weights

    ones = torch.ones(1, w.shape[1], dtype=w.dtype, device=w.device)
    return kernel_or_twin("awq_candidate_weights",
                          lambda: candidate_weights(w, ones, cov[None], _clip_ratios(w.device), grid,
                                                    clipped_only=True)[0],
                          lambda: clip_search(w, cov, grid))


def _candidate_weights_torch(scaled: torch.Tensor, se: torch.Tensor, cov: torch.Tensor | None,
                             grid: WeightGrid) -> torch.Tensor:
    """``Q(clip(scaled)) / s`` of scaled candidates ``[B, out, in]`` (unclipped without ``cov``), in PyTorch ops."""
    if cov is not None:
        scaled = clip_search(scaled, cov, grid, input_scales=se)
    if grid.qscheme == QSchemeType.per_tensor or grid.scale_dtype is not None:  # one scale per candidate
        quantized = torch.stack([fake_quant_weight(c, grid) for c in scaled])
    else:  # groups and channels are independent: every candidate's rows in one call
        quantized = fake_quant_weight(scaled.reshape(-1, scaled.shape[-1]), grid).reshape(scaled.shape)
    return quantized / se[:, None, :]


def _fused_candidates_apply(w: torch.Tensor, grid: WeightGrid) -> bool:
    """Whether :func:`_fused_candidate_weights` takes weight ``w``'s candidates: the clip kernel's grids (one-stage
    integer groups) with float scales, weights in bfloat16 or float32."""
    return (grid.qscheme == QSchemeType.per_group and grid.scale_dtype is None
            and grid.scale_type == ScaleType.float and _clip_kernel_applies(w, grid)
            and w.dtype in (torch.bfloat16, torch.float32) and w.shape[-1] % grid.group_size == 0)


def _fused_candidate_weights(w: torch.Tensor, se: torch.Tensor, covs: torch.Tensor,
                             grid: WeightGrid) -> torch.Tensor:
    """:func:`_candidate_weights_torch` of ``w [out, in]`` scaled by each row of ``se`` in one Triton kernel a batch,
    bit for bit (:func:`~quark.torch.algorithm.kernels.clip.candidate_weights`): the scaled weight in its dtype,
    each ratio's clipped min-max grid from the group's range (clamping and rounding commute with the minimum and
    maximum), judged with the candidate's covariance ``covs [B, G, gs, gs]`` (:func:`_candidate_covariances`), the
    best clipped, quantized and divided by ``s``."""
    from quark.torch.algorithm.kernels.clip import candidate_weights

    return candidate_weights(w, se, covs, _clip_ratios(w.device), grid)


def group_input_covariance(x: torch.Tensor, group_size: int, token_chunk: int | None = None) -> torch.Tensor:
    """``[groups, gs, gs]``: each input group's second moment ``mean_t x_g x_gᵀ`` over all tokens.

    Massive tokens are capped as in GPTQ's Hessian (:mod:`quark.torch.algorithm.utils.tokens`).
    """
    return group_input_stats([x], [group_size], token_chunk=token_chunk).reduce().covariance(group_size)


def scaled_covariance(cov: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The group covariances of ``x / scales`` from those of ``x`` (``cov [G, gs, gs]``, ``scales [G * gs]``)."""
    s = scales.to(device=cov.device, dtype=cov.dtype).reshape(cov.shape[0], -1)
    return cov / (s[:, :, None] * s[:, None, :])


#: Elements of the candidates' weights (times the clip ratios) judged in one batch: on a CPU whose
#: cores are shared, every op's parallel region costs a time slice, so small layers judge all their
#: candidates together; large ones go one candidate at a time.
CANDIDATE_BATCH_ELEMENTS = 1 << 23


#: Clipped candidate weights (rows × columns × clip ratios) judged per step of :func:`clip_search`.
#: On a GPU the search is otherwise bound by launching its ~25 ops per step (Llama-3-8B's gate and up
#: projections: 141 steps each per candidate at 4M); each float32 temporary of a step is 4 bytes an element.
CLIP_CHUNK_ELEMENTS = 1 << 22
CLIP_CHUNK_ELEMENTS_GPU = 1 << 25


#: Output elements whose squared error is taken in one float32 step (bounds the temporaries of judging a
#: candidate: a merged call of the MLP's outputs is 64M elements).
ERROR_CHUNK_ELEMENTS = 1 << 24


def _candidate_chunk(weights: Sequence[torch.Tensor]) -> int:
    per_candidate = sum(w.numel() for w in weights) * CLIP_STEPS
    return max(1, min(N_GRID, CANDIDATE_BATCH_ELEMENTS // max(per_candidate, 1)))


def _squared_error(run: Any, module: nn.Module, calls: list[tuple[tuple, dict]],
                   reference: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(Σ (out - reference)², element count)`` of ``module`` over ``calls``, one call's output at a time: the
    sum a float64 0-d tensor on the outputs' device (no synchronisation)."""
    total = torch.zeros((), dtype=torch.float64, device=reference[0].device if reference else None)
    count = 0
    for call, ref in zip(calls, reference):
        out = run(module, [call])[0]
        total += _squared_error_sum(out, ref)
        count += out.numel()
    return total, count


def _squared_error_sum(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``Σ (out - ref)²`` (0-d float64): the Triton kernel where it runs, else :func:`_squared_error_torch`."""
    if not triton_applies(out):
        return _squared_error_torch(out, ref)
    from quark.torch.algorithm.kernels.error import squared_error_sum

    return kernel_or_twin("awq_squared_error", lambda: squared_error_sum(out, ref),
                          lambda: _squared_error_torch(out, ref))


def _squared_error_torch(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``Σ (out - ref)²`` (0-d float64), ``ERROR_CHUNK_ELEMENTS`` elements in float32 at a time."""
    flat_out, flat_ref = out.reshape(-1), ref.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=out.device)
    for e0 in range(0, flat_out.numel(), ERROR_CHUNK_ELEMENTS):
        d = flat_out[e0:e0 + ERROR_CHUNK_ELEMENTS].float() - flat_ref[e0:e0 + ERROR_CHUNK_ELEMENTS].float()
        total += d.pow(2).sum(dtype=torch.float64)
    return total


def _scaled_covariances(covariances: dict[int, torch.Tensor], scales: torch.Tensor) -> dict[int, torch.Tensor]:
    return {size: scaled_covariance(cov, scales) for size, cov in covariances.items()}


@torch.no_grad()
def clip_search(w: torch.Tensor, cov: torch.Tensor, grid: WeightGrid, oc_chunk: int | None = None,
                input_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Clip each (row, group) of ``w`` to the shrink ratio that minimises the group's output error.

    The error of a group ``e = Q(clip(w_g)) - w_g`` on the outputs is ``mean_t (x_g · e)²
    = e C_g eᵀ`` with ``C_g = cov[g]`` the group's input covariance
    (:func:`group_input_covariance`), so every calibration token counts
    (AutoAWQ samples 512 of them) at no extra cost. ``w`` may be a batch ``[B, out, in]`` of
    candidates with their covariances ``[B, G, gs, gs]``, or with one covariance ``[G, gs, gs]`` of
    the unscaled input and each candidate's input scales ``input_scales [B, in]`` (the candidate's
    inputs are ``x / s``: its covariance is ``C / (s sᵀ)``). All ``CLIP_STEPS`` ratios are judged in one
    batch (a few large tensor ops instead of many small ones: on a CPU shared by several threads
    each op's fixed cost dominates); the first ratio with the smallest error wins, as in a
    sequential search. Rows go ``oc_chunk`` at a time (default: ``CLIP_CHUNK_ELEMENTS`` clipped weights
    per chunk, ``CLIP_CHUNK_ELEMENTS_GPU`` on a GPU). On a GPU, integer grids in groups of 16 to 256
    are judged by one Triton kernel (:mod:`quark.torch.algorithm.kernels.clip`: the same errors up to
    float summation order).

    ``Q`` is the grid's own fake quantization. For block formats (OCP MX, BFP16/MX6/MX9) the
    clipped range only matters through the block's power-of-two exponent and the values it
    saturates: the ratios (1 down to 0.55, less than one binade) choose between the block's
    min-max exponent and the next lower one, saturating the largest values for twice the
    resolution of the rest, which is a real choice, so these are searched too. A two-stage grid
    keeps the scale stage's per-tensor scale of the unclipped weight while candidates are judged.
    A per-tensor grid has one scale set by a single row: clipping rows is not its choice, so ``w``
    comes back unchanged.
    """
    gs = grid.group_size
    if input_scales is not None:
        if w.dim() != 3 or cov.dim() != 3 or input_scales.shape != (w.shape[0], w.shape[2]):
            raise ValueError(f"clip_search: input_scales {tuple(input_scales.shape)} need a batch of weights "
                             f"{tuple(w.shape)} and one covariance [G, gs, gs], got {tuple(cov.shape)}")
        if grid.scale_dtype is not None or not _clip_kernel_applies(w, grid):  # each candidate's covariance
            cov, input_scales = _candidate_covariances(cov, input_scales), None
    if input_scales is None and w.dim() == 3:  # a batch of candidates, each with its own covariance
        if cov.dim() != 4 or cov.shape[0] != w.shape[0]:
            raise ValueError(f"clip_search: {w.shape[0]} weights need as many covariances, got shape "
                             f"{tuple(cov.shape)}")
        if grid.scale_dtype is not None:  # each candidate's own scale stage
            return torch.stack([clip_search(wb, cb, grid, oc_chunk) for wb, cb in zip(w, cov)])
    w3 = w if w.dim() == 3 else w[None]
    batch, out, cols = w3.shape
    cov_groups = cov.shape[-3:]
    if cov_groups != (cols // gs, gs, gs):
        raise ValueError(f"clip_search: covariance of shape {tuple(cov_groups)} does not match {cols} inputs in "
                         f"groups of {gs}")
    if grid.qscheme == QSchemeType.per_tensor:
        return w
    scale2 = stage_two_scale(w3[0], grid)
    groups = cols // gs
    ratios = _clip_ratios(w.device)
    if (cov.dim() == 3 or batch == 1) and _clip_kernel_applies(w3, grid):
        def kernel() -> torch.Tensor:
            # bfloat16 and float32 weights are read as they are (the kernel converts each element exactly)
            wk = w3 if w3.dtype in (torch.bfloat16, torch.float32) else w3.float()
            clipped3 = _kernel_clip(wk.reshape(batch, out, groups, gs), ratios, cov.reshape(cov_groups), grid,
                                    scale2, input_scales)
            result = clipped3.reshape(batch, out, cols).to(w.dtype)
            return result if w.dim() == 3 else result[0]

        def twin() -> torch.Tensor:
            covs = cov if input_scales is None else _candidate_covariances(cov, input_scales)
            return _clip_search_torch(w, w3, covs, grid, oc_chunk, scale2, ratios)

        return kernel_or_twin("awq_clip_search", kernel, twin)
    return _clip_search_torch(w, w3, cov, grid, oc_chunk, scale2, ratios)


def _clip_search_torch(w: torch.Tensor, w3: torch.Tensor, cov: torch.Tensor, grid: WeightGrid, oc_chunk: int | None,
                       scale2: torch.Tensor | None, ratios: torch.Tensor) -> torch.Tensor:
    """:func:`clip_search` in PyTorch: ``w3`` is ``w`` as a batch, ``cov`` its covariances (one, or one each)."""
    batch, out, cols = w3.shape
    gs = grid.group_size
    groups = cols // gs
    cov4 = cov if cov.dim() == 4 else cov[None]
    elements = CLIP_CHUNK_ELEMENTS_GPU if w.is_cuda else CLIP_CHUNK_ELEMENTS
    oc_chunk = oc_chunk or max(1, elements // (batch * cols * CLIP_STEPS))
    clipped = []
    for o0 in range(0, out, oc_chunk):
        wg = w3[:, o0:o0 + oc_chunk].float().reshape(batch, -1, groups, gs)  # [batch, rows, G, gs]
        rows = wg.shape[1]
        max0 = wg.abs().amax(-1, keepdim=True)
        # [batch * G, steps * rows, gs] against each candidate's group covariances [batch * G, gs, gs]
        e = (_block_clip_errors if grid.is_block else _clip_errors)(wg, max0, ratios, grid, scale2)
        err = (torch.bmm(e, cov4.reshape(batch * groups, gs, gs)) * e).sum(-1)  # e C_g eᵀ
        err = err.reshape(batch, groups, CLIP_STEPS, rows)
        best = torch.nan_to_num(err, nan=float("inf")).argmin(2).transpose(1, 2)  # [batch, rows, G]: first minimum
        best_max = max0 * ratios[best][..., None]
        clipped.append(torch.maximum(torch.minimum(wg, best_max), -best_max).reshape(batch, -1, cols))
    result = torch.cat(clipped, 1).to(w.dtype)
    return result if w.dim() == 3 else result[0]


def _candidate_covariances(cov: torch.Tensor, input_scales: torch.Tensor) -> torch.Tensor:
    """``[B, G, gs, gs]``: the covariance ``cov [G, gs, gs]`` of each candidate's inputs ``x / s``."""
    return torch.stack([scaled_covariance(cov, s) for s in input_scales])


def _clipped_qparams(wmin: torch.Tensor, wmax: torch.Tensor, bound: torch.Tensor, grid: WeightGrid,
                     scale2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid parameters of groups clipped to ``±bound``, from the unclipped groups' minima and maxima
    (clamping commutes with the minimum and maximum); a two-stage grid's scales on its stage ``scale2``."""
    lo = torch.clamp(wmin, -bound, bound)
    hi = torch.clamp(wmax, -bound, bound)
    scale, zp = minmax_qparams(lo, hi, grid)
    return second_stage_scales(scale, grid, scale2)[0], zp


_RATIOS: dict[torch.device, torch.Tensor] = {}


def _clip_ratios(device: torch.device) -> torch.Tensor:
    """The clipping search's shrink ratios ``1, 0.95, ..., 0.55`` (``CLIP_STEPS``, float32), made once per device
    (the candidates' search asks for them ~140 times a layer). Read-only."""
    device = torch.device(device)
    if device not in _RATIOS:
        _RATIOS[device] = 1 - torch.arange(CLIP_STEPS, device=device, dtype=torch.float32) / N_GRID
    return _RATIOS[device]


def _clip_kernel_applies(w: torch.Tensor, grid: WeightGrid) -> bool:
    return kernels_apply(w, grid) and kernel_group_size(grid.group_size)


def _kernel_clip(wg: torch.Tensor, ratios: torch.Tensor, cov: torch.Tensor, grid: WeightGrid,
                 scale2: torch.Tensor | None, input_scales: torch.Tensor | None) -> torch.Tensor:
    """:func:`clip_search`'s clipped ``wg [batch, rows, G, gs]`` (float32 result) with the errors judged by the
    Triton kernel; each ratio's grid parameters come from the same formulas as :func:`_clip_errors`'. A covariance
    shared by every candidate goes in as one per candidate (``expand``, a view), so the final clipping launches
    the kernel variant the scale candidates use (on a bfloat16 model: one compilation less)."""
    from quark.torch.algorithm.kernels.clip import best_clip_steps

    wmin, wmax = (t.float() for t in torch.aminmax(wg, dim=-1))  # one pass: max|w| is the larger of -min and max
    max0 = torch.maximum(-wmin, wmax)  # [batch, rows, G]
    bound = max0[:, None] * ratios[None, :, None, None]  # [batch, steps, rows, G]
    scale, zp = _clipped_qparams(wmin[:, None], wmax[:, None], bound, grid, scale2)
    del bound
    covs = cov if input_scales is None else _candidate_covariances(cov, input_scales)
    if covs.dim() == 3:
        covs = covs.expand(wg.shape[0], *covs.shape)
    best = best_clip_steps(wg, max0, scale, zp, ratios, covs, grid)
    best_max = (max0 * ratios[best])[..., None]
    return torch.clamp(wg.float(), -best_max, best_max)


def _clip_errors(wg: torch.Tensor, max0: torch.Tensor, ratios: torch.Tensor, grid: WeightGrid,
                 scale2: torch.Tensor | None) -> torch.Tensor:
    """``Q(clip(w)) - w`` for every ratio, ``[batch * G, steps * rows, gs]``, of ``wg [batch, rows, G, gs]``
    on an integer or scaled-float grid.

    Built in the layout the error product reads (no copy), with each clipped group's min-max range
    taken from the unclipped one (:func:`_clipped_qparams`): the same values as :func:`fake_quant_weight`
    of each clipped weight, in fewer passes over ``steps`` × the weights.
    """
    batch, _, groups, gs = wg.shape
    wp = wg.permute(0, 2, 1, 3)  # [batch, G, rows, gs]
    mx = max0.permute(0, 2, 1, 3)[:, :, None] * ratios[:, None, None]  # [batch, G, steps, rows, 1]
    cur = torch.clamp(wp[:, :, None], -mx, mx)
    scale, zp = _clipped_qparams(wp.amin(-1)[:, :, None], wp.amax(-1)[:, :, None], mx[..., 0], grid, scale2)
    q = fake_quant_with(cur, scale[..., None], zp[..., None], grid)
    return (q - wp[:, :, None]).reshape(batch * groups, -1, gs)


def _block_clip_errors(wg: torch.Tensor, max0: torch.Tensor, ratios: torch.Tensor, grid: WeightGrid,
                       scale2: torch.Tensor | None) -> torch.Tensor:
    """:func:`_clip_errors` for block formats, whose element scales come from each clipped block."""
    batch, _, groups, gs = wg.shape
    mx = max0[None] * ratios[:, None, None, None, None]  # [steps, batch, rows, G, 1]
    cur = torch.maximum(torch.minimum(wg[None], mx), -mx)
    q = fake_quant_weight(cur.reshape(-1, groups * gs), grid, scale2=scale2).reshape(cur.shape)
    return (q - wg[None]).permute(1, 3, 0, 2, 4).reshape(batch * groups, -1, gs)


def awq_grids(model: nn.Module, path: str, layers: nn.ModuleList, groups: Sequence[ScalingGroup],
              quant_config: Any, owner: str = "AWQConfig") -> list[dict[str, WeightGrid]]:
    """Validate names and weight specs of every group in every layer; return the grids."""
    grids: list[dict[str, WeightGrid]] = []
    for i, layer in enumerate(layers):
        validate_groups(layer, groups, owner)
        per: dict[str, WeightGrid] = {}
        for g in groups:
            if not applies_to(layer, g):
                continue
            for n in g.layers:
                fc = layer.get_submodule(n)
                spec = weight_spec_for(f"{path}.{i}.{n}", fc, quant_config)
                if spec is None:
                    continue
                per[n] = weight_grid_from_spec(spec, f"{owner}: {path}.{i}.{n}", fc.in_features,
                                            allowed=ALL_QSCHEMES, dtypes=ALL_WEIGHT_DTYPES)
        grids.append(per)
    return grids


class AwqProcessor(AlgorithmProcessor):
    """AWQ over a whole model: ``AwqProcessor(model, algo_config, data, quant_config=...).apply()``.

    Every weight format a quantizer supports is accepted (integers per group, channel or tensor,
    scaled fp8/fp6/fp4 including two-stage scales, OCP MX, BFP16/MX6/MX9); candidates are judged
    with the grid's own fake quantization. Specs are checked for every targeted linear before any
    weight changes. ``results`` holds the per-layer scales after ``apply``. On failure the
    model's weights are restored.
    """

    def __init__(self, model: nn.Module, algo_config: Any, data: Sequence[Any], quant_config: Any = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(model, algo_config, data, quant_config, device)
        self.results: list[ScaleResult] = []

    def build_step(self) -> tuple[str, AwqStep]:
        path, groups = groups_from_config(self.cfg, self.model, self.data, "AWQConfig")
        _, layers = find_decoder_layers(self.model, path)
        grids = awq_grids(self.model, path, layers, groups, self.quant_config)
        if not any(grids):
            raise ValueError("AWQConfig: no linear of the scaling groups has a quantized weight")
        return path, AwqStep(groups, list(layers), grids,
                             clip_in_scale_search=bool(getattr(self.cfg, "clip_in_scale_search", True)))

    def apply(self, backup: ModelBackup | None = None) -> None:
        path, step = self.build_step()
        run_layerwise(self.model, self.data, [step], self.device, decoder_path=path, backup=backup, desc="AWQ")
        self.results = step.results
