"""The elementwise gain of a normalisation layer: ``weight``, or ``offset + weight``.

Most norms multiply the normalised input by their ``weight``; Gemma's RMSNorm (and others written
the same way) multiply by ``1 + weight``, so that a weight of zero is the identity. Scaling a norm's
output by ``1 / s`` (SmoothQuant, AWQ) or folding its gain into the next linears (rotation) must
change the *gain*; changing ``weight`` as if it were the gain silently gives another model. The
offset is probed, not looked up by class name, so any family written either way is handled.
"""

from __future__ import annotations

import torch
from torch import nn

from quark.torch.algorithm.utils.probe import tolerance

__all__ = ["gain", "gain_offset", "set_gain"]

#: Offsets of the elementwise gain found in transformers' norms.
_KNOWN_OFFSETS = (0.0, 1.0)


@torch.no_grad()
def gain_offset(norm: nn.Module) -> float:
    """``c`` such that ``norm`` multiplies its normalised input by ``c + weight`` (0 or 1).

    Probed with the weight (and bias) set to 0, 1 and 2 on a fixed random input; ``ValueError``
    when the weight does not act as an elementwise gain of either form.
    """
    weight = norm.weight
    bias = getattr(norm, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    x = torch.randn(4, weight.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.to(weight.device, weight.dtype)
    saved_weight = weight.detach().clone()
    saved_bias = bias.detach().clone() if bias is not None else None
    try:
        if bias is not None:
            bias.zero_()
        weight.zero_()
        at_zero = norm(x).double()
        weight.fill_(1.0)
        unit = norm(x).double() - at_zero  # the normalised input
        weight.fill_(2.0)
        at_two = norm(x).double()
    finally:
        weight.copy_(saved_weight)
        if bias is not None and saved_bias is not None:
            bias.copy_(saved_bias)
    scale = float(unit.abs().max())
    if scale == 0.0 or not torch.isfinite(unit).all():
        raise ValueError(f"{type(norm).__name__}: its weight does not scale its output elementwise")
    bound = tolerance(weight.dtype) * max(scale, 1.0)
    if float((at_two - at_zero - 2 * unit).abs().max()) > bound:  # not linear in the weight
        raise ValueError(f"{type(norm).__name__}: its gain is neither its weight nor 1 + its weight")
    for offset in _KNOWN_OFFSETS:
        if float((at_zero - offset * unit).abs().max()) <= bound:
            return offset
    raise ValueError(f"{type(norm).__name__}: its gain is neither its weight nor 1 + its weight")


def gain(norm: nn.Module, offset: float) -> torch.Tensor:
    """The elementwise gain ``offset + weight`` in float64."""
    return norm.weight.double() + offset


@torch.no_grad()
def set_gain(norm: nn.Module, value: torch.Tensor, offset: float) -> None:
    """Store ``value`` as the norm's elementwise gain (its weight becomes ``value - offset``)."""
    weight = norm.weight
    weight.copy_((value.to(weight.device, torch.float64) - offset).to(weight.dtype))
