"""GPTQ's column loop over one block in one Triton kernel (the PyTorch twin is ``gptq.columns.column_loop``).

Rows are independent given the inverse Hessian, so each program takes a tile of rows and walks the
block's columns in order with the tile in registers: column ``i`` is quantized, its scaled error
``(w - q) / d_i`` is written out and spread over the later columns of the tile by
``w[:, j] -= e · hinv[i, j]``. The eager loop launches about 7 kernels a column; this launches one
a block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quark.torch.algorithm.kernels import grid_arguments
from quark.torch.algorithm.kernels.grid import fake_quant_int
from quark.torch.algorithm.utils.quant import WeightGrid


@triton.jit
def _block_kernel(w_ptr, hinv_ptr, scale_ptr, inv_ptr, zp_ptr, q_ptr, err_ptr, rows, ncols, qmin, qmax,
                  BR: tl.constexpr, B: tl.constexpr, METHOD: tl.constexpr, ZERO_FREE: tl.constexpr,
                  EXACT: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    in_rows = r < rows
    c = tl.arange(0, B)
    in_cols = c < ncols
    w = tl.load(w_ptr + r[:, None] * ncols + c[None, :], mask=in_rows[:, None] & in_cols[None, :], other=0.0)
    for i in range(ncols):
        col = tl.sum(tl.where(c[None, :] == i, w, 0.0), 1)  # one non-zero term: exact
        at = r * ncols + i
        scale = tl.load(scale_ptr + at, mask=in_rows, other=1.0)
        inv = tl.load(inv_ptr + at, mask=in_rows, other=1.0)
        zp = tl.load(zp_ptr + at, mask=in_rows, other=0.0)
        q = fake_quant_int(col, inv, scale, zp, qmin, qmax, METHOD, ZERO_FREE, EXACT)
        e = tl.math.div_rn(col - q, tl.load(hinv_ptr + i * ncols + i))
        h = tl.load(hinv_ptr + i * ncols + c, mask=(c >= i) & in_cols, other=0.0)
        w = w - e[:, None] * h[None, :]
        tl.store(q_ptr + at, q, mask=in_rows)
        tl.store(err_ptr + at, e, mask=in_rows)


def quantize_block_kernel(w1: torch.Tensor, hinv1: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          grid: WeightGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q1, err1)`` of the block ``w1 [out, B]`` (float32) as ``gptq.columns.column_loop`` computes them,
    for an integer ``grid``; ``scales``/``zeros [out, B]`` hold each column's parameters."""
    rows, ncols = w1.shape
    w1 = w1.contiguous()
    scales = scales.contiguous()
    inv = torch.reciprocal(scales)
    q1, err1 = torch.empty_like(w1), torch.empty_like(w1)
    width = triton.next_power_of_2(ncols)
    block_rows = 32 if width >= 128 else 64
    _block_kernel[(triton.cdiv(rows, block_rows),)](
        w1, hinv1.contiguous(), scales, inv, zeros.contiguous(), q1, err1, rows, ncols, BR=block_rows, B=width,
        num_warps=4, **grid_arguments(grid))
    return q1, err1
