"""GPTQ's sequential column loop over one block, run eagerly or replayed as a CUDA graph.

The loop quantizes one column at a time and spreads its rounding error over the block's later
columns: ~10 small kernels per column, so on a GPU it is bound by kernel launches, not by
arithmetic. When every column's grid parameters are known before the block starts (static groups,
per-channel, per-tensor), the whole block is captured once per shape as a CUDA graph and replayed:
the same kernels on the same values, so the result is bit-identical to the eager loop. Integer
and fp8 grids are captured; the others (fp6/fp4 elements, OCP MX, BFP) run eagerly.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from quark.torch.algorithm.kernels import kernel_or_twin, kernels_apply
from quark.torch.algorithm.utils.quant import WeightGrid, fake_quant_with, round_to_grid
from quark.torch.quantization.formats.affine import get_integer_division

logger = logging.getLogger(__name__)

USE_CUDA_GRAPHS = True  # read at call time; False runs every block eagerly
MAX_CACHED_GRAPHS = 16

_GraphKey = tuple[torch.device, int, int, torch.dtype, WeightGrid, str]


def column_loop(w1: torch.Tensor, hinv1: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, grid: WeightGrid,
                q1: torch.Tensor, err1: torch.Tensor, start: int, stop: int) -> None:
    """Quantize columns ``start..stop-1`` of the block ``w1 [out, B]`` in place.

    ``scales``/``zeros`` are ``[out, B]`` (column ``i``'s grid parameters in column ``i``);
    ``hinv1 [B, B]`` is the block of the inverse Hessian's upper Cholesky factor. Writes the
    quantized columns into ``q1`` and the scaled errors ``(w - q) / d`` into ``err1``; the later
    columns of ``w1`` receive each error's update.

    Integer grids run the quantizer's arithmetic (:func:`fake_quant_with`) op for op, with the
    block's reciprocal scales taken once and results written in place: 7 kernels a column instead
    of 10 for a signed symmetric grid (on a GPU the loop is bound by kernel launches).
    """
    if grid.is_block or grid.is_float:
        for i in range(start, stop):
            c = w1[:, i]
            q = fake_quant_with(c, scales[:, i], zeros[:, i], grid)
            q1[:, i] = q
            e = (c - q) / hinv1[i, i]
            w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1)
            err1[:, i] = e
        return
    exact = get_integer_division() == "exact"
    inverse = None if exact else torch.reciprocal(scales[:, start:stop])
    for i in range(start, stop):
        c = w1[:, i]
        v = c / scales[:, i] if inverse is None else c * inverse[:, i - start]
        v = round_to_grid(v, grid.round_method)
        if grid.zero_point_free:
            v.clamp_(grid.qmin, grid.qmax)
        else:
            v = (v + zeros[:, i]).clamp_(grid.qmin, grid.qmax) - zeros[:, i]
        torch.mul(v, scales[:, i], out=q1[:, i])
        e = err1[:, i]
        torch.sub(c, q1[:, i], out=e)
        e.div_(hinv1[i, i])
        w1[:, i:].addr_(e, hinv1[i, i:], alpha=-1)


@dataclass
class _BlockGraph:
    """A captured :func:`column_loop` over a whole block and the static tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    w1: torch.Tensor
    hinv1: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    q1: torch.Tensor
    err1: torch.Tensor


_graphs: OrderedDict[_GraphKey, _BlockGraph | None] = OrderedDict()


def clear_graph_cache() -> None:
    """Release every captured block graph (and the device memory it holds)."""
    _graphs.clear()


def _capture(w1: torch.Tensor, hinv1: torch.Tensor, grid: WeightGrid) -> _BlockGraph:
    with torch.cuda.device(w1.device):
        bw, bs, bz, bq, be = (torch.zeros_like(w1) for _ in range(5))
        bh = torch.eye(hinv1.shape[0], device=hinv1.device, dtype=hinv1.dtype)
        bs.fill_(1.0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (library handles, workspaces)
            column_loop(bw, bh, bs, bz, grid, bq, be, 0, w1.shape[1])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            column_loop(bw, bh, bs, bz, grid, bq, be, 0, w1.shape[1])
    return _BlockGraph(graph, bw, bh, bs, bz, bq, be)


def _block_graph(w1: torch.Tensor, hinv1: torch.Tensor, grid: WeightGrid) -> _BlockGraph | None:
    key = (w1.device, w1.shape[0], w1.shape[1], w1.dtype, grid, get_integer_division())
    if key in _graphs:
        _graphs.move_to_end(key)
        return _graphs[key]
    try:
        entry: _BlockGraph | None = _capture(w1, hinv1, grid)
    except RuntimeError as exc:  # capture unsupported here: remember, and run this shape eagerly
        logger.debug("GPTQ: CUDA graph capture failed for block %s (%s); running it eagerly", key[1:3], exc)
        entry = None
    _graphs[key] = entry
    while len(_graphs) > MAX_CACHED_GRAPHS:
        _graphs.popitem(last=False)
    return entry


def quantize_block(w1: torch.Tensor, hinv1: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   grid: WeightGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole block's quantized columns and scaled errors ``(q1, err1)``, each ``[out, B]``.

    On CUDA an integer grid's loop is one Triton kernel (:mod:`quark.torch.algorithm.kernels.columns`,
    the same arithmetic per element; the error update may be fused into one multiply-add), else
    (and with :data:`USE_CUDA_GRAPHS`) the loop of an integer or fp8 grid is a replayed CUDA graph;
    other grids (fp6/fp4 element rounding, block formats) run eagerly. ``w1`` is not modified
    either way.
    """
    if w1.dtype == torch.float32 and kernels_apply(w1, grid):
        from quark.torch.algorithm.kernels.columns import quantize_block_kernel

        return kernel_or_twin("gptq_block", lambda: quantize_block_kernel(w1, hinv1, scales, zeros, grid),
                              lambda: _quantize_block_torch(w1, hinv1, scales, zeros, grid))
    return _quantize_block_torch(w1, hinv1, scales, zeros, grid)


def _quantize_block_torch(w1: torch.Tensor, hinv1: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          grid: WeightGrid) -> tuple[torch.Tensor, torch.Tensor]:
    if USE_CUDA_GRAPHS and w1.is_cuda and grid.graph_safe:
        entry = _block_graph(w1, hinv1, grid)
        if entry is not None:
            entry.w1.copy_(w1)
            entry.hinv1.copy_(hinv1)
            entry.scales.copy_(scales)
            entry.zeros.copy_(zeros)
            entry.graph.replay()
            return entry.q1.clone(), entry.err1.clone()
    w1 = w1.clone()
    q1, err1 = torch.empty_like(w1), torch.empty_like(w1)
    column_loop(w1, hinv1, scales, zeros, grid, q1, err1, 0, w1.shape[1])
    return q1, err1
