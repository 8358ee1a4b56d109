"""AWQ's squared output error in one Triton kernel (the PyTorch twin is ``awq._squared_error_torch``).

Each program sums ``(a - b)²`` over ``BLOCK`` elements in float32, reading the two outputs in their own
(half-precision) dtype; the partial sums are added in float64. The twin converts both outputs to float32,
subtracts, squares and sums, in five passes over the data.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Elements one program sums.
BLOCK = 4096


@triton.jit
def _squared_error_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    a = tl.load(a_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    d = a - b
    tl.store(out_ptr + pid, tl.sum(d * d, 0))


def squared_error_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ (a - b)²`` over every element (a 0-d float64 tensor on their device); ``a`` and ``b`` have one shape."""
    if a.shape != b.shape:
        raise ValueError(f"squared_error_sum: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    a, b = a.reshape(-1).contiguous(), b.reshape(-1).contiguous()
    n = a.numel()
    programs = max(triton.cdiv(n, BLOCK), 1)
    partial = torch.empty(programs, dtype=torch.float32, device=a.device)
    _squared_error_kernel[(programs,)](a, b, partial, n, BLOCK=BLOCK, num_warps=8)
    return partial.sum(dtype=torch.float64)
