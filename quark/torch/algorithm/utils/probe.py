"""Tolerances of the checks that probe a module's float behaviour (structure discovery, norm gains, rotation's
structure): a relative bound per dtype, and closeness relative to the larger magnitude of two tensors."""

from __future__ import annotations

import torch

__all__ = ["close", "tolerance"]


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the structural checks for tensors of ``dtype``."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """``a ≈ b`` with an error bound relative to the larger magnitude of the two."""
    if a.shape != b.shape:
        return False
    a, b = a.double(), b.double()
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) <= rel * scale
