"""GPTQ on one weight matrix (Frantar et al., 2022): pure tensor math, no modules.

Columns are quantized one after another; each column's rounding error is spread over the columns
not yet quantized through the inverse Hessian's upper Cholesky factor. Updates are applied
lazily per block of columns (``block_size``, a multiple of the group size so that a group never
straddles two blocks, which keeps the result identical to the unblocked algorithm).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quark.torch.algorithm.gptq.columns import column_loop, quantize_block
from quark.torch.algorithm.kernels import kernel_group_size, kernel_or_twin, kernels_apply
from quark.torch.algorithm.utils.gram import add_gram_rows, gram, half_gemm
from quark.torch.algorithm.utils.quant import (
    WeightGrid,
    block_element_scales,
    fake_quant_with,
    minmax_qparams,
    second_stage_scales,
)
from quark.torch.quantization.config.type import QSchemeType

logger = logging.getLogger(__name__)

_MAX_DAMP_RETRIES = 4


@dataclass
class GptqResult:
    """Quantized (dequantized-float) weight, its fixed qparams and the GPTQ loss estimate.

    ``scale``/``zero_point``: ``[out]`` per channel or ``[out, in // group]`` per group (a
    two-stage grid's first-stage scales before its scale stage, whose per-tensor scale is
    ``scale2``). Block formats store no parameters: ``scale`` is each element's power of two
    ``[out, in]``, for information only.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    loss: float
    damp: float
    scale2: torch.Tensor | None = None
    row_losses: torch.Tensor | None = None  # ``[out]``: each row's share of ``loss``


def accumulate_hessian(h: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running mean of ``2 x xᵀ`` over tokens: ``x`` is ``[..., in]``; returns ``(H, count)``.

    On a GPU, half-precision tokens (bf16/fp16, the model's dtype) go into one half-precision GEMM
    with float32 accumulation and output (:mod:`quark.torch.algorithm.utils.gram`): a product of two bf16/fp16 values
    is exact in float32, so only the summation order differs from the float32 GEMM, which on an H100
    runs at about a tenth of the speed (Llama-3-8B's down_proj, 65,536 tokens: 27 TFLOP a layer).
    Elsewhere the tokens are scaled in float32 and summed in float32.
    """
    x = x.reshape(-1, x.shape[-1])
    n = x.shape[0]
    if h is None:
        h = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
    total = count + n
    if half_gemm(x):
        h.mul_(count / total).add_(gram(x), alpha=2.0 / total)
        return h, total
    x = x.float()
    h.mul_(count / total)
    x = x * (2.0 / total) ** 0.5
    h.addmm_(x.t(), x)
    return h, total


def accumulate_hessian_sum(s: torch.Tensor | None, count: int, x: torch.Tensor,
                           token_chunk: int = 4096) -> tuple[torch.Tensor, int]:
    """Float64 sum of ``x xᵀ`` over the tokens of ``x [..., in]`` and their count: ``(S, count)``;
    the Hessian is :func:`hessian_from_sum`.

    Products of float32 values are exact in float64 and their sums nearly so, so however the tokens
    are split (over calls, merged batches or data-parallel ranks) the float32 Hessian comes out the
    same, but for a float64 rounding that lands on a float32 tie. Tokens are converted
    ``token_chunk`` at a time. On a GPU, bf16/fp16 tokens are multiplied in float32 chunk by chunk
    (``4 * token_chunk`` tokens a GEMM), so there the split changes the float32 partial sums.
    """
    x = x.reshape(-1, x.shape[-1])
    if s is None:
        s = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
    if half_gemm(x):
        # on a GPU, half-precision tokens: each chunk's products in tensor-core GEMMs with float32
        # accumulation (exact products; a float64 GEMM runs at a fraction of the rate), summed in float64,
        # a block of rows of the product at a time (add_gram_rows)
        for t0 in range(0, x.shape[0], 4 * token_chunk):
            add_gram_rows(s, x[t0:t0 + 4 * token_chunk])
        return s, count + x.shape[0]
    for t0 in range(0, x.shape[0], token_chunk):
        xs = x[t0:t0 + token_chunk].double()
        s.addmm_(xs.t(), xs)
    return s, count + x.shape[0]


#: Rows of a float64 Hessian sum converted at a time (bounds the float64 temporary: Llama-3-8B's down_proj
#: sum is 1.5 GiB).
CONVERT_ROWS = 1024


def hessian_from_sum(s: torch.Tensor, count: int) -> torch.Tensor:
    """The float32 Hessian ``2 S / count`` of :func:`accumulate_hessian_sum`'s sum (divided once), converted
    ``CONVERT_ROWS`` rows at a time."""
    h = torch.empty(s.shape, dtype=torch.float32, device=s.device)
    for r0 in range(0, s.shape[0], CONVERT_ROWS):
        h[r0:r0 + CONVERT_ROWS] = s[r0:r0 + CONVERT_ROWS] * 2.0 / max(count, 1)
    return h


def accumulate_cross(d: torch.Tensor | None, count: int, x_float: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Running mean of ``2 (x_float - x) xᵀ`` over ``count`` earlier and these tokens (``[in, in]``).

    Kept with the Hessian of the same ``x`` (call before :func:`accumulate_hessian` with the same count).
    """
    x = x.reshape(-1, x.shape[-1]).float()
    dx = x_float.reshape(-1, x.shape[-1]).float() - x
    if d is None:
        d = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
    total = count + x.shape[0]
    d.mul_(count / total)
    d.addmm_(dx.t(), x, alpha=2.0 / total)
    return d


def _permute_in_place(h: torch.Tensor, perm: torch.Tensor) -> None:
    """``h[:] = h[perm][:, perm]`` with one ``h``-sized temporary (rows copied back ``CONVERT_ROWS`` at a time)."""
    rows = h[perm]
    for r0 in range(0, h.shape[0], CONVERT_ROWS):
        h[r0:r0 + CONVERT_ROWS] = rows[r0:r0 + CONVERT_ROWS][:, perm]


def _revive_dead_inputs(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``h`` (modified in place) with a unit diagonal for inputs no token used, and their mask."""
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    return h, dead


def float_target_weight(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor,
                        damp_percent: float) -> torch.Tensor:
    """The weight whose outputs on the quantized inputs best match the float layer's outputs.

    With ``H = Σ x xᵀ`` over the quantized model's inputs ``x`` and ``D = Σ (x̃ - x) xᵀ`` with the
    float model's inputs ``x̃``, ``argmin_V Σ ||W x̃ - V x||² = W + W D H⁻¹`` (H damped as GPTQ damps
    it). GPTQ on that weight minimises ``Σ ||W x̃ - Q x||²``: the error the earlier quantized layers
    left in the inputs is corrected too (the asymmetric calibration of GPTAQ, Li et al., 2025).
    """
    w = weight.float()
    h, dead = _revive_dead_inputs(hessian.float().clone())
    h.diagonal().add_(damp_percent * torch.mean(torch.diag(h)))
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        return weight
    # (W D) H⁻¹ = (H⁻¹ (W D)ᵀ)ᵀ, H symmetric
    shift = torch.cholesky_solve((w @ cross.float()).t(), lower).t()
    shift[:, dead] = 0.0
    return (w + shift).to(weight.dtype)


def _inverse_cholesky(h: torch.Tensor, damp_percent: float, name: str) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor of the damped ``h``'s inverse, and the damping used. ``h`` is damped in
    place (its diagonal restored before returning): no copy of it is made."""
    diagonal = torch.diag(h)  # a copy
    mean_diag = torch.mean(diagonal).item()
    damp = damp_percent
    try:
        for attempt in range(_MAX_DAMP_RETRIES + 1):
            # intermediates are dropped as soon as used: each is [in, in] float32 (822 MB for in = 14336)
            h.diagonal().copy_(diagonal + damp * mean_diag)
            lower, info = torch.linalg.cholesky_ex(h)
            if info.item() == 0:
                hinv = torch.cholesky_inverse(lower)
                del lower
                upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
                del hinv
                if info.item() == 0:
                    return upper, damp
                del upper
            else:
                del lower  # a failed factor is not held while the next one is computed
            if attempt < _MAX_DAMP_RETRIES:
                new = max(damp * 10, 0.01)
                logger.warning("GPTQ %s: Hessian not positive definite with damp_percent=%g; retrying with %g",
                               name, damp, new)
                damp = new
    finally:
        h.diagonal().copy_(diagonal)
    raise RuntimeError(
        f"GPTQ {name}: the Hessian is not positive definite even with damp_percent={damp:g}; "
        "raise GPTQConfig.damp_percent or use more calibration data"
    )


CLIP_MIN_RATIO = 0.5


def group_params(w: torch.Tensor, grid: WeightGrid, hdiag: torch.Tensor, clip_steps: int,
                 per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``[out, G]`` of ``w [out, G, gs]`` (``G`` groups of ``gs`` columns).

    Min-max when ``clip_steps`` is 0. Otherwise the range is also shrunk by ``clip_steps`` ratios
    down to ``CLIP_MIN_RATIO`` and each (row, group) keeps the ratio whose rounding error, weighted
    by the Hessian diagonal ``hdiag [G, gs]``, is smallest; per-tensor, one ratio for the tensor.
    """
    if per_tensor:
        lo, hi = w.min().expand(w.shape[:2]), w.max().expand(w.shape[:2])
    else:
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale, zp = minmax_qparams(lo, hi, grid)
    if clip_steps <= 0:
        return scale, zp
    if not per_tensor and w.dtype == torch.float32 and kernels_apply(w, grid) and kernel_group_size(w.shape[-1]):
        return kernel_or_twin("gptq_range_search", lambda: _kernel_group_params(w, grid, hdiag, clip_steps, lo, hi),
                              lambda: _searched_params(w, grid, hdiag, clip_steps, lo, hi, scale, zp, per_tensor))
    return _searched_params(w, grid, hdiag, clip_steps, lo, hi, scale, zp, per_tensor)


def _searched_params(w: torch.Tensor, grid: WeightGrid, hdiag: torch.Tensor, clip_steps: int, lo: torch.Tensor,
                     hi: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, per_tensor: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`group_params`' search in PyTorch, from the min-max ``scale``/``zp``."""
    best = torch.full_like(scale, float("inf"))
    for ratio in _range_ratios(clip_steps):
        s, z = minmax_qparams(lo * ratio, hi * ratio, grid)
        err = ((w - fake_quant_with(w, s[..., None], z[..., None], grid)) ** 2 * hdiag).sum(dim=-1)
        if per_tensor:
            err = err.sum().expand_as(err)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zp = torch.where(better, z, zp)
    return scale, zp


def _range_ratios(clip_steps: int) -> list[float]:
    """The range search's shrink ratios: 1 down to ``CLIP_MIN_RATIO`` in ``clip_steps`` steps."""
    return [1.0 - (1.0 - CLIP_MIN_RATIO) * k / clip_steps for k in range(clip_steps + 1)]


#: Grid parameters (steps × rows × groups) computed per piece of rows for the range-search kernel.
RANGE_SEARCH_PARAMS = 1 << 24


def _kernel_group_params(w: torch.Tensor, grid: WeightGrid, hdiag: torch.Tensor, clip_steps: int,
                         lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`group_params`' search with the errors judged by a Triton kernel: each step's parameters
    from the same formula, the kernel picks each (row, group)'s first least-error step."""
    from quark.torch.algorithm.kernels.clip import best_range_steps

    out, groups, _ = w.shape
    ratios = _range_ratios(clip_steps)
    piece = max(1, RANGE_SEARCH_PARAMS // (len(ratios) * groups))
    scales, zps = [], []
    for r0 in range(0, out, piece):
        params = [minmax_qparams(lo[r0:r0 + piece] * ratio, hi[r0:r0 + piece] * ratio, grid) for ratio in ratios]
        s = torch.stack([p[0] for p in params])
        z = torch.stack([p[1] for p in params])
        del params
        best = best_range_steps(w[r0:r0 + piece], hdiag, s, z, grid)[None]
        scales.append(s.gather(0, best)[0])
        zps.append(z.gather(0, best)[0])
    return torch.cat(scales), torch.cat(zps)


def stackable(grid: WeightGrid) -> bool:
    """Whether weights on ``grid`` may be stacked along their rows into one :func:`gptq_quantize` call.

    GPTQ treats rows independently given the Hessian; only grids whose parameters span rows (one
    per-tensor scale, a two-stage grid's per-tensor scale stage) tie the rows of one weight together.
    """
    return grid.qscheme != QSchemeType.per_tensor and grid.scale_dtype is None


def gptq_quantize_stacked(weights: Sequence[torch.Tensor], hessian: torch.Tensor, grid: WeightGrid,
                          **kwargs: Any) -> list[GptqResult]:
    """:func:`gptq_quantize` of several weights fed the same input (q/k/v, gate/up), in one call.

    The weights share the Hessian, so one factorisation and one column loop over the stacked rows
    serve them all; each block's update of the later columns is one product per weight, of the
    shapes the separate calls use, so each result is bit-identical to its own call.
    ``grid`` must be :func:`stackable`.
    """
    if not stackable(grid):
        raise ValueError(f"gptq_quantize_stacked: a {grid.qscheme.name} grid with scale stage {grid.scale_dtype} "
                         "ties the rows of each weight together; quantize the weights one by one")
    rows = [w.shape[0] for w in weights]
    res = gptq_quantize(torch.cat(list(weights), 0), hessian, grid, rows=rows, **kwargs)
    assert res.row_losses is not None
    parts = []
    for r0, r1 in itertools.pairwise(itertools.accumulate(rows, initial=0)):
        zp = res.zero_point[r0:r1]
        parts.append(GptqResult(res.weight[r0:r1], res.scale[r0:r1], zp, float(res.row_losses[r0:r1].sum()),
                                res.damp, res.scale2, res.row_losses[r0:r1]))
    return parts


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: WeightGrid, damp_percent: float = 0.01,
                  desc_act: bool = False, static_groups: bool = False, block_size: int = 128,
                  name: str = "layer", clip_steps: int = 0, rows: Sequence[int] | None = None,
                  scratch_hessian: bool = False) -> GptqResult:
    """Quantize ``weight [out, in]`` given the input Hessian ``[in, in]``.

    ``scratch_hessian``: the caller does not need ``hessian`` afterwards, so it is worked on in place (its
    contents change) instead of copied first: one ``[in, in]`` matrix less on the device (0.8 GiB for
    Llama-3-8B's down_proj).

    ``rows``: the row counts of weights stacked in ``weight`` (see :func:`gptq_quantize_stacked`);
    each block's update of the later columns then runs per stacked weight.

    ``clip_steps`` > 0 searches a clipping ratio per group or channel of an integer grid (see
    :func:`group_params`); per-tensor and FP8 ranges stay min-max, where the search measured worse
    (SmolLM2-135M fp8 W8A8 22.39 -> 22.53, int8 QuaRot 24.66 -> 24.83).

    Block formats (OCP MX, BFP16/MX6/MX9) fix each block's element scales (its shared exponent,
    MX6/MX9 also its pairs' micro-exponents) from the block's weights, from the original weights
    with ``static_groups``, else from the updated ones when the block's first column is reached,
    and round column by column on them. Either way the result is a fixed point of the format's own
    quantization (float and BFP grids are nested across exponents), which recomputes the
    exponents from the weight it is given. A two-stage grid quantizes its scales with the scale
    stage before the loop (so it needs ``static_groups`` for per-group weights).
    """
    out, cols = weight.shape
    per_group = grid.qscheme == QSchemeType.per_group
    per_tensor = grid.qscheme == QSchemeType.per_tensor
    if per_tensor or grid.is_float or grid.is_block:
        clip_steps = 0
    gs = grid.group_size if per_group else cols
    if per_group and desc_act and not static_groups:
        raise ValueError(
            f"GPTQ {name}: desc_act=True with static_groups=False needs a per-column group index, "
            "which quantized linears do not store; set GPTQConfig.static_groups=True or desc_act=False"
        )
    if per_group and not static_groups and grid.scale_dtype is not None:
        raise ValueError(
            f"GPTQ {name}: static_groups=False with a two-stage weight spec is not supported: the scale stage's "
            "per-tensor scale needs every group's scale before the first column; set GPTQConfig.static_groups=True"
        )
    # float64 weights are processed in float64 (used by the exactness tests), all else in float32.
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().clone().to(work)
    in_place = scratch_hessian and hessian.dtype == work and hessian.device == w.device
    h, dead = _revive_dead_inputs(hessian.detach() if in_place else hessian.detach().clone().to(w.device, work))
    w[:, dead] = 0.0

    n_groups = cols // gs
    hdiag = torch.diag(h)
    fixed = static_groups or not per_group
    scale2 = None
    column_scales = None  # block formats: every column's scale, in the (permuted) column order
    if grid.is_block:
        scales = block_element_scales(w, grid).to(work) if fixed else torch.zeros_like(w)
        zeros = torch.zeros_like(w)
        column_scales = scales
    elif fixed:
        scales, zeros = group_params(w.reshape(out, n_groups, gs), grid, hdiag.reshape(n_groups, gs),
                                     clip_steps, per_tensor)
        raw_scales = scales
        scales, scale2 = second_stage_scales(scales, grid)
        scales, zeros = scales.to(work), zeros.to(work)
    else:  # filled group by group as the columns are reached
        scales = torch.zeros(out, n_groups, device=w.device, dtype=work)
        zeros = torch.zeros(out, n_groups, device=w.device, dtype=work)

    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        _permute_in_place(h, perm)
        if column_scales is not None:
            column_scales = column_scales[:, perm]
    hinv, damp = _inverse_cholesky(h, damp_percent, name)
    del h
    splits = list(itertools.accumulate(rows, initial=0)) if rows is not None else [0, out]
    if splits[-1] != out:
        raise ValueError(f"GPTQ {name}: rows={list(rows or [])} do not add up to the weight's {out} rows")

    block = max(block_size // gs, 1) * gs if per_group else block_size
    # column -> its group (in the permuted order), for gathering each block's per-column parameters
    group_of = torch.arange(cols, device=w.device) if perm is None else perm
    group_of = torch.div(group_of, gs, rounding_mode="floor")
    q_all = torch.zeros_like(w)
    losses = torch.zeros(out, device=w.device, dtype=work)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        hinv1 = hinv[i1:i2, i1:i2]
        if fixed and column_scales is not None:
            q1, err1 = quantize_block(w[:, i1:i2], hinv1, column_scales[:, i1:i2], zeros[:, i1:i2], grid)
        elif fixed:
            cols_g = group_of[i1:i2]
            q1, err1 = quantize_block(w[:, i1:i2], hinv1, scales.index_select(1, cols_g),
                                      zeros.index_select(1, cols_g), grid)
        else:  # no act-order here: the block holds whole groups, each ranged when its first column is reached
            w1 = w[:, i1:i2].clone()
            q1, err1 = torch.empty_like(w1), torch.empty_like(w1)
            s1, z1 = torch.empty_like(w1), torch.empty_like(w1)
            for i in range(0, i2 - i1, gs):
                g = (i1 + i) // gs
                if grid.is_block:  # the block's exponents from its updated weights
                    s1[:, i:i + gs] = block_element_scales(w1[:, i:i + gs], grid).to(work)
                    z1[:, i:i + gs] = 0.0
                    scales[:, i1 + i:i1 + i + gs] = s1[:, i:i + gs]
                else:
                    sg, zg = group_params(w1[:, None, i:i + gs], grid, hdiag[None, i1 + i:i1 + i + gs], clip_steps)
                    scales[:, g], zeros[:, g] = sg[:, 0], zg[:, 0]
                    s1[:, i:i + gs], z1[:, i:i + gs] = sg, zg
                column_loop(w1, hinv1, s1, z1, grid, q1, err1, i, i + gs)
        q_all[:, i1:i2] = q1
        losses += err1.pow(2).sum(1) / 2  # (c - q)² / d² / 2 per column
        for r0, r1 in itertools.pairwise(splits):  # per stacked weight: the shapes of its own call
            if r1 - r0 == out:
                w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
            else:
                w[r0:r1, i2:] -= err1[r0:r1] @ hinv[i1:i2, i2:]
    if perm is not None:
        q_all = q_all[:, torch.argsort(perm)]
    if not torch.isfinite(q_all).all():
        raise RuntimeError(f"GPTQ {name}: the quantized weight contains NaN or inf")
    q_all, loss = q_all.to(weight.dtype), float(losses.sum())
    if grid.is_block:
        return GptqResult(q_all, scales, zeros, loss, damp, row_losses=losses)
    if scale2 is not None:
        scales = raw_scales.to(work)
    if per_group:
        return GptqResult(q_all, scales, zeros, loss, damp, scale2, losses)
    if per_tensor:
        return GptqResult(q_all, scales[0, 0], zeros[0, 0], loss, damp, row_losses=losses)
    return GptqResult(q_all, scales[:, 0], zeros[:, 0], loss, damp, scale2, losses)
