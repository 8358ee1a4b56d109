"""Second-moment products ``xᵀ x`` in float32, on a GPU from half-precision tokens without a float copy.

A product of two bf16 (or fp16) values is exact in float32, so a half-precision GEMM that accumulates
and writes float32 (``out_dtype``, CUDA only) differs from the float32 GEMM only in summation order,
and runs on the tensor cores: on an H100 about ten times the float32 rate. On a CPU, or for float32
tokens, the product is the plain float32 one.
"""

from __future__ import annotations

import torch

__all__ = ["GRAM_ROWS", "add_gram_rows", "gram", "half_gemm", "matmul_f32"]


def half_gemm(*tensors: torch.Tensor) -> bool:
    """Whether products of ``tensors`` run as half-precision GEMMs with float32 output (CUDA bf16/fp16)."""
    return all(t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) for t in tensors) and len(
        {t.dtype for t in tensors}) == 1


def gram(x: torch.Tensor) -> torch.Tensor:
    """``xᵀ x`` in float32 for ``x [n, d]`` (``[d, d]``) or a batch ``x [B, n, d]`` (``[B, d, d]``)."""
    if x.dim() not in (2, 3):
        raise ValueError(f"gram: x must be [n, d] or [B, n, d], got shape {tuple(x.shape)}")
    xt = x.transpose(-2, -1)
    if half_gemm(x):
        return (torch.mm if x.dim() == 2 else torch.bmm)(xt, x, out_dtype=torch.float32)
    xf = x.float()
    return xf.transpose(-2, -1) @ xf


#: Rows of ``xᵀ x`` one half-precision GEMM of :func:`add_gram_rows` writes (bounds its float32 result on the
#: device: the whole product for Llama-3-8B's down_proj input is 0.8 GiB).
GRAM_ROWS = 2048


def add_gram_rows(total: torch.Tensor, x: torch.Tensor) -> None:
    """``total += xᵀ x`` for half-precision ``x [n, d]`` on a GPU (:func:`half_gemm`), ``GRAM_ROWS`` rows of the
    float32 product at a time, so no second ``[d, d]`` matrix is made (``total`` float32 or float64)."""
    for r0 in range(0, x.shape[1], GRAM_ROWS):
        total[r0:r0 + GRAM_ROWS] += torch.mm(x[:, r0:r0 + GRAM_ROWS].t(), x, out_dtype=torch.float32)


def matmul_f32(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` (2-D) with a float32 result, its inputs rounded to ``dtype`` first on a GPU when that
    is bf16/fp16 (the half-precision GEMM with float32 accumulation), in float32 elsewhere."""
    if a.is_cuda and dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a.to(dtype), b.to(dtype), out_dtype=torch.float32)
    return a.float() @ b.float()
