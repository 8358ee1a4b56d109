"""AWQ's clipping search in one Triton kernel (the PyTorch twin is ``awq.clip_search``'s own loop).

For every (candidate, row, group) and every shrink ratio ``r``, the error of the clipped and quantized
group ``e = Q(clip(w, ±r·max|w|)) - w`` is judged on the outputs as ``e C eᵀ`` with the group's input
covariance ``C``; the kernel keeps the first ratio of least error. AWQ's scale candidates (inputs ``x / s``)
come each with its own covariance ``C / (s sᵀ)``, from the caller (``awq._candidate_covariances``).
:func:`best_clip_steps` (AWQ's final clipping) takes each ratio's grid parameters from the caller's
PyTorch formulas; :func:`candidate_weights` (AWQ's scale candidates) computes them in the kernel with the same
float32 operations (:func:`_range_qparams`) and goes on to the clipped, quantized and rescaled candidate, so a
candidate is one launch that reads the weight once instead of ~45 small ones.

Every kernel here launches with ``enable_fp_fusion=False``. With fusion (Triton 3.6's default on CUDA)
the compiler may turn ``v = x * inv`` and the rounding's ``v - floor(v)`` into one fused multiply-add,
which skips the rounding of the product. A symmetric grid puts each group's extreme value exactly on a
half step (``amax / scale = (qmax - qmin) / 2``: 7.5 for int4), where that decides the level: on an H100
the fused kernel chose another clipping ratio than the PyTorch path for 0.7% of int4 weights, 2.2% worse
in what the search minimises (``tests/algorithm/test_kernels.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quark.torch.algorithm.kernels import grid_arguments
from quark.torch.algorithm.kernels.grid import fake_quant_int, round_to_grid
from quark.torch.algorithm.utils.quant import WeightGrid
from quark.torch.quantization.formats.table import FORMATS
from quark.torch.quantization.observer.observer import int_range_divisor, symmetric_zero_point

#: Precision of the kernel's ``e C`` products. ``"tf32"`` (one TF32 product on the tensor cores: inputs
#: rounded to 10 mantissa bits, float32 sums) judges each ratio's error to ~1e-3 of itself, so only near-ties
#: can change (H100, Llama-3-8B's gate_proj, one candidate: 3.9 ms, and 99.999% of the choices of
#: ``"tf32x3"``, which takes 7.5 ms for float32's accuracy; ``"ieee"`` float32 FMAs took 1.06 s of GPU time
#: per layer, the largest part of AWQ's time there). ``bench/bench_clip_kernel.py`` compares them.
CLIP_DOT_PRECISION = "tf32"

#: Rows of a weight one program of the clipping kernel takes, and its warps, by group size (``None``:
#: 64 rows below 128 columns a group, else 32; 8 warps from 128 columns, else 4).
#: ``bench/bench_clip_kernel.py`` times the alternatives.
CLIP_BLOCK_ROWS: int | None = None
CLIP_NUM_WARPS: int | None = None


@triton.jit
def _group_tile(rows, cols, groups, GS: tl.constexpr, BR: tl.constexpr):
    """This program's tile of a ``[batch, rows, groups * GS]`` weight: program axis 0 is (candidate ``b``, group
    ``g``), axis 1 a block of ``BR`` rows ``r``. Returns ``b``, ``g``, ``r``, the group's columns ``c``, the rows'
    mask, the tile's element offsets and each row's offset in ``[batch, rows, groups]`` tensors."""
    pid = tl.program_id(0)
    b = pid // groups
    g = pid % groups
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    c = tl.arange(0, GS)
    at = b * rows * cols + r[:, None] * cols + g * GS + c[None, :]
    return b, g, r, c, r < rows, at, (b * rows + r) * groups + g


@triton.jit
def _keep_better(e, cov, k, best_err, best_k, DOT_PRECISION: tl.constexpr):
    """Each row's error ``e C eᵀ`` for ratio ``k``; ``(best_err, best_k)`` updated where it is less (the first of
    equal minima stays; NaN never wins)."""
    err = tl.sum(tl.dot(e, cov, input_precision=DOT_PRECISION) * e, 1)
    err = tl.where(err != err, float("inf"), err)
    better = err < best_err
    return tl.where(better, err, best_err), tl.where(better, k, best_k)


@triton.jit
def _clip_search_kernel(w_ptr, cov_ptr, scale_ptr, inv_ptr, zp_ptr, max_ptr, ratio_ptr, best_ptr,
                        rows, cols, groups, qmin, qmax,
                        GS: tl.constexpr, BR: tl.constexpr, STEPS: tl.constexpr, COV_PER_CANDIDATE: tl.constexpr,
                        METHOD: tl.constexpr, ZERO_FREE: tl.constexpr, EXACT: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    b, g, r, c, in_rows, at, row_group = _group_tile(rows, cols, groups, GS, BR)
    w = tl.load(w_ptr + at, mask=in_rows[:, None], other=0.0).to(tl.float32)
    cov_group = b * groups + g if COV_PER_CANDIDATE else g
    cov = tl.load(cov_ptr + cov_group * GS * GS + c[:, None] * GS + c[None, :])
    max0 = tl.load(max_ptr + row_group, mask=in_rows, other=0.0)
    best_err = tl.full([BR], float("inf"), tl.float32)
    best_k = tl.zeros([BR], tl.int32)
    for k in range(STEPS):
        bound = max0 * tl.load(ratio_ptr + k)
        cur = tl.minimum(tl.maximum(w, -bound[:, None]), bound[:, None])
        p = ((b * STEPS + k) * rows + r) * groups + g
        scale = tl.load(scale_ptr + p, mask=in_rows, other=1.0)
        inv = tl.load(inv_ptr + p, mask=in_rows, other=1.0)
        zp = tl.load(zp_ptr + p, mask=in_rows, other=0.0)
        q = fake_quant_int(cur, inv[:, None], scale[:, None], zp[:, None], qmin, qmax, METHOD, ZERO_FREE, EXACT)
        best_err, best_k = _keep_better(q - w, cov, k, best_err, best_k, DOT_PRECISION)
    tl.store(best_ptr + row_group, best_k, mask=in_rows)


def best_clip_steps(wg: torch.Tensor, max0: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, ratios: torch.Tensor,
                    cov: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """Index of the best ratio ``[batch, rows, G]`` (int64) for weights ``wg [batch, rows, G, gs]`` (float32, or
    the model's half precision: read as float32).

    ``max0 [batch, rows, G]``: each group's ``max|w|``; ``scale``/``zp [batch, steps, rows, G]``: the grid
    parameters of each ratio's clipped group; ``cov``: the input covariances, ``[G, gs, gs]`` for every candidate or
    ``[batch, G, gs, gs]`` one set each.
    """
    batch, rows, groups, gs = wg.shape
    steps = ratios.numel()
    wg = wg.contiguous()
    scale = scale.float().contiguous()
    inv = torch.reciprocal(scale)
    best = torch.empty(batch, rows, groups, dtype=torch.int32, device=wg.device)
    block_rows = CLIP_BLOCK_ROWS or (64 if gs <= 64 else 32)
    grid_shape = (batch * groups, triton.cdiv(rows, block_rows))
    _clip_search_kernel[grid_shape](
        wg, cov.float().contiguous(), scale, inv, zp.float().contiguous(), max0.float().contiguous(),
        ratios.float().contiguous(), best, rows, groups * gs, groups, GS=gs, BR=block_rows, STEPS=steps,
        COV_PER_CANDIDATE=cov.dim() == 4, DOT_PRECISION=CLIP_DOT_PRECISION,
        num_warps=CLIP_NUM_WARPS or (8 if gs >= 128 else 4), enable_fp_fusion=False,
        **grid_arguments(grid))
    return best.long()


@triton.jit
def _round_bf16(x):
    """float32 to the nearest bfloat16 value (ties to even), still float32, in integer arithmetic: the same on
    a GPU and under Triton's interpreter (whose conversion truncates). For finite ``x``."""
    u = x.to(tl.uint32, bitcast=True)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _range_qparams(lo, hi, qmin, qmax, divisor, midpoint, eps, SYMMETRIC: tl.constexpr):
    """Min-max scale and zero point of integer groups ranging over ``[lo, hi]``, op for op as the observers'
    ``range_to_qparams`` (float32, float scales, integer zero points): the range widened to include 0,
    correctly rounded divisions, scales at least ``eps``, zero points rounded half to even and clamped."""
    min_neg = tl.minimum(lo, 0.0)
    max_pos = tl.maximum(hi, 0.0)
    if SYMMETRIC:
        scale = tl.math.div_rn(tl.maximum(-min_neg, max_pos), divisor)
        scale = tl.where(scale < eps, eps, scale)  # NaN stays NaN, as torch.clamp keeps it
        zp = tl.zeros_like(scale) + midpoint
    else:
        scale = tl.math.div_rn(max_pos - min_neg, divisor)
        scale = tl.where(scale < eps, eps, scale)
        zp = qmin - round_to_grid(tl.math.div_rn(min_neg, scale), 0)
        zp = tl.minimum(tl.maximum(zp, qmin), qmax)
    return scale, zp


@triton.jit(do_not_specialize=["clipped_only"])  # one compilation serves both uses
def _candidate_weights_kernel(w_ptr, s_ptr, cov_ptr, ratio_ptr, out_ptr, rows, cols, groups, qmin, qmax, divisor,
                              midpoint, eps, clipped_only, GS: tl.constexpr, BR: tl.constexpr, STEPS: tl.constexpr,
                              BF16: tl.constexpr, SYMMETRIC: tl.constexpr, METHOD: tl.constexpr,
                              ZERO_FREE: tl.constexpr, EXACT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // groups
    g = pid % groups
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    c = tl.arange(0, GS)
    in_rows = r < rows
    col = g * GS + c
    w = tl.load(w_ptr + r[:, None] * cols + col[None, :], mask=in_rows[:, None], other=0.0).to(tl.float32)
    s = tl.load(s_ptr + b * cols + col).to(tl.float32)
    x = w * s[None, :]
    if BF16:  # the scaled weight in the weight's dtype, as w * s of two bfloat16 tensors
        x = _round_bf16(x)
    lo = tl.min(x, 1)
    hi = tl.max(x, 1)
    max0 = tl.maximum(-lo, hi)
    cov = tl.load(cov_ptr + (b * groups + g) * GS * GS + c[:, None] * GS + c[None, :])
    best_err = tl.full([BR], float("inf"), tl.float32)
    best_k = tl.zeros([BR], tl.int32)
    for k in range(STEPS):
        bound = max0 * tl.load(ratio_ptr + k)
        scale, zp = _range_qparams(tl.minimum(tl.maximum(lo, -bound), bound),
                                   tl.minimum(tl.maximum(hi, -bound), bound), qmin, qmax, divisor, midpoint, eps,
                                   SYMMETRIC)
        inv = tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale)
        cur = tl.minimum(tl.maximum(x, -bound[:, None]), bound[:, None])
        e = fake_quant_int(cur, inv[:, None], scale[:, None], zp[:, None], qmin, qmax, METHOD, ZERO_FREE, EXACT) - x
        best_err, best_k = _keep_better(e, cov, k, best_err, best_k, DOT_PRECISION)
    bound = max0 * tl.load(ratio_ptr + best_k)
    v = tl.minimum(tl.maximum(x, -bound[:, None]), bound[:, None])
    if BF16:  # each step rounds to the weight's dtype, as the PyTorch ops on bfloat16 tensors do
        v = _round_bf16(v)
    if clipped_only == 0:
        lo = tl.minimum(tl.maximum(lo, -bound), bound)
        hi = tl.minimum(tl.maximum(hi, -bound), bound)
        if BF16:  # the clipped group's range in the weight's dtype, as the clipped weight has it
            lo = _round_bf16(lo)
            hi = _round_bf16(hi)
        scale, zp = _range_qparams(lo, hi, qmin, qmax, divisor, midpoint, eps, SYMMETRIC)
        inv = tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale)
        v = fake_quant_int(v, inv[:, None], scale[:, None], zp[:, None], qmin, qmax, METHOD, ZERO_FREE, EXACT)
        if BF16:
            v = _round_bf16(v)
        s = tl.load(s_ptr + b * cols + col).to(tl.float32)  # read again: not held through the loop's registers
        v = tl.math.div_rn(v, s[None, :])
        if BF16:
            v = _round_bf16(v)
    tl.store(out_ptr + b * rows * cols + r[:, None] * cols + col[None, :], v.to(out_ptr.dtype.element_ty),
             mask=in_rows[:, None])


def candidate_weights(w: torch.Tensor, input_scales: torch.Tensor, covs: torch.Tensor, ratios: torch.Tensor,
                      grid: WeightGrid, clipped_only: bool = False) -> torch.Tensor:
    """AWQ's clipped scale candidates ``Q(clip(w * s)) / s`` (``[batch, rows, G * gs]`` in ``w``'s dtype) of a
    weight ``w [rows, G * gs]`` (bfloat16 or float32) for each row ``s`` of ``input_scales [batch, G * gs]`` (in
    ``w``'s dtype), in one pass: each group of ``w * s`` is clipped to the shrink ratio of ``ratios`` whose
    error ``e C eᵀ`` is least, with ``C`` the candidate's input covariance (``covs [batch, G, gs, gs]``), then
    fake-quantized on its min-max grid and divided by ``s``, rounding to the dtype where the PyTorch ops do.
    For one-stage integer groups with float scales (``awq._fused_candidates_apply``). ``clipped_only``: the
    clipped ``w * s`` itself, neither quantized nor divided (AWQ's final clipping, with ``s`` = 1)."""
    if w.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"candidate_weights: weights of dtype {w.dtype}; allowed: bfloat16, float32")
    rows, cols = w.shape
    batch = input_scales.shape[0]
    gs = grid.group_size
    groups = cols // gs
    if covs.shape != (batch, groups, gs, gs):
        raise ValueError(f"candidate_weights: covariances of shape {tuple(covs.shape)}, expected "
                         f"{(batch, groups, gs, gs)}")
    info = FORMATS[grid.dtype]
    out = torch.empty(batch, rows, cols, dtype=w.dtype, device=w.device)
    block_rows = CLIP_BLOCK_ROWS or (64 if gs <= 64 else 32)
    _candidate_weights_kernel[(batch * groups, triton.cdiv(rows, block_rows))](
        w.contiguous(), input_scales.to(w.dtype).contiguous(), covs.float().contiguous(), ratios.float().contiguous(),
        out, rows, cols, groups, divisor=int_range_divisor(info, symmetric=grid.symmetric),
        midpoint=symmetric_zero_point(info), eps=torch.finfo(torch.float32).eps, clipped_only=int(clipped_only),
        GS=gs, BR=block_rows, STEPS=ratios.numel(), BF16=w.dtype == torch.bfloat16, SYMMETRIC=grid.symmetric,
        DOT_PRECISION=CLIP_DOT_PRECISION, num_warps=CLIP_NUM_WARPS or (8 if gs >= 128 else 4),
        enable_fp_fusion=False, **grid_arguments(grid))
    return out


@triton.jit
def _range_search_kernel(w_ptr, hd_ptr, scale_ptr, inv_ptr, zp_ptr, best_ptr, rows, cols, groups, qmin, qmax,
                         GS: tl.constexpr, BR: tl.constexpr, STEPS: tl.constexpr, METHOD: tl.constexpr,
                         ZERO_FREE: tl.constexpr, EXACT: tl.constexpr):
    g = tl.program_id(0)
    r = tl.program_id(1) * BR + tl.arange(0, BR)
    in_rows = r < rows
    c = tl.arange(0, GS)
    w = tl.load(w_ptr + r[:, None] * cols + g * GS + c[None, :], mask=in_rows[:, None], other=0.0)
    hd = tl.load(hd_ptr + g * GS + c)
    best_err = tl.full([BR], float("inf"), tl.float32)
    best_k = tl.zeros([BR], tl.int32)
    for k in range(STEPS):
        p = (k * rows + r) * groups + g
        scale = tl.load(scale_ptr + p, mask=in_rows, other=1.0)
        inv = tl.load(inv_ptr + p, mask=in_rows, other=1.0)
        zp = tl.load(zp_ptr + p, mask=in_rows, other=0.0)
        d = w - fake_quant_int(w, inv[:, None], scale[:, None], zp[:, None], qmin, qmax, METHOD, ZERO_FREE, EXACT)
        err = tl.sum(d * d * hd[None, :], 1)
        better = err < best_err  # NaN never wins; the first of equal minima stays
        best_err = tl.where(better, err, best_err)
        best_k = tl.where(better, k, best_k)
    tl.store(best_ptr + r * groups + g, best_k, mask=in_rows)


def best_range_steps(w: torch.Tensor, hdiag: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                     grid: WeightGrid) -> torch.Tensor:
    """GPTQ's range search: for ``w [rows, G, gs]`` (float32) and each step's parameters ``scale``/``zp
    [steps, rows, G]``, the index ``[rows, G]`` (int64) of the step whose rounding error weighted by the
    Hessian diagonal ``hdiag [G, gs]`` is least (the first of equal minima)."""
    rows, groups, gs = w.shape
    steps = scale.shape[0]
    scale = scale.float().contiguous()
    inv = torch.reciprocal(scale)
    best = torch.empty(rows, groups, dtype=torch.int32, device=w.device)
    block_rows = 64 if gs <= 64 else 32
    _range_search_kernel[(groups, triton.cdiv(rows, block_rows))](
        w.contiguous(), hdiag.float().contiguous(), scale, inv, zp.float().contiguous(), best, rows, groups * gs,
        groups, GS=gs, BR=block_rows, STEPS=steps, num_warps=4, enable_fp_fusion=False, **grid_arguments(grid))
    return best.long()
