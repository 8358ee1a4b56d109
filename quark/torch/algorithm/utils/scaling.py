"""Output-preserving rescalings shared by SmoothQuant, AWQ and rotation (layer 7).

Each op multiplies the inputs of some linears by a per-channel factor ``s`` and divides the
producer of those inputs by the same factor, so the float function is unchanged:
``fc(norm(x))`` = ``(fc * s)(norm(x) / s)``. ``s`` always lives in the producer's output space.

Grouped-query attention: ``v_proj`` produces ``kv_heads * head_dim`` channels while ``o_proj``
reads ``heads * head_dim``; each kv channel feeds ``heads / kv_heads`` o_proj channels, so ``s``
is expanded by repeating every kv head (:func:`expand_scales`) and statistics of o_proj's input
are reduced back to kv channels (:func:`reduce_to_prev`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from quark.torch.algorithm.utils.norms import gain_offset


def _repeat(n_in: int, n_prev: int, head_dim: int | None, owner: str) -> int:
    if n_in == n_prev:
        return 1
    if head_dim is None or n_in % n_prev != 0 or n_prev % head_dim != 0:
        raise ValueError(
            f"{owner}: cannot map {n_prev} producer channels onto {n_in} consumer inputs "
            f"(head_dim={head_dim}); only equal sizes or grouped-query heads are supported"
        )
    return n_in // n_prev


def expand_scales(s: torch.Tensor, n_in: int, head_dim: int | None = None) -> torch.Tensor:
    """Map producer-space scales to the consumer's input channels (repeats kv heads for GQA)."""
    rep = _repeat(n_in, s.numel(), head_dim, "expand_scales")
    if rep == 1:
        return s
    return s.view(-1, head_dim).repeat_interleave(rep, dim=0).reshape(n_in)


def reduce_to_prev(stat: torch.Tensor, n_prev: int, head_dim: int | None = None,
                   how: str = "max") -> torch.Tensor:
    """Reduce a per-input-channel statistic of the consumer to the producer's channels."""
    rep = _repeat(stat.numel(), n_prev, head_dim, "reduce_to_prev")
    if rep == 1:
        return stat
    v = stat.view(n_prev // head_dim, rep, head_dim)
    return (v.amax(1) if how == "max" else v.mean(1)).reshape(n_prev)


def candidate_slices(n_out: int, lengths: Iterable[int]) -> Iterator[tuple[int, int]]:
    """``(start, length)`` row windows of a fused producer's ``n_out`` outputs that a consumer may read.

    In the order fused layouts make likely: for each length (callers pass the longest first), the
    tail (``q|k|v`` puts the values last, ``gate|up`` the up projection), then the head.
    """
    for length in lengths:
        if length <= n_out:
            for start in dict.fromkeys((n_out - length, 0)):
                yield start, length


def _check_fc_inputs(fcs: Sequence[nn.Linear], n: int, owner: str) -> None:
    for fc in fcs:
        if not isinstance(fc, nn.Linear) or fc.in_features != n:
            raise ValueError(f"{owner}: expected nn.Linear consumers with {n} inputs, got {fc!r}")


@torch.no_grad()
def scale_norm_fcs(norm: nn.Module, fcs: Sequence[nn.Linear], s: torch.Tensor) -> None:
    """Divide a norm's gain (its weight, or ``1 + weight``; and bias) by ``s``; multiply the following
    linears' columns by ``s``."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.numel() != s.numel():
        raise ValueError(
            f"scale_norm_fcs: {type(norm).__name__} has no 1-D weight of size {s.numel()} to scale"
        )
    _check_fc_inputs(fcs, s.numel(), "scale_norm_fcs")
    offset = gain_offset(norm)  # Gemma-style norms multiply by 1 + weight: the gain is what is divided
    s = s.to(weight.device, torch.float32)
    if offset == 0.0:
        weight.copy_((weight.float() / s).to(weight.dtype))
    else:
        weight.copy_(((weight.float() + offset) / s - offset).to(weight.dtype))
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.float() / s).to(bias.dtype))
    for fc in fcs:
        fc.weight.copy_((fc.weight.float() * s.to(fc.weight.device)).to(fc.weight.dtype))


@torch.no_grad()
def scale_fc_fc(fc1: nn.Linear, fc2s: Sequence[nn.Linear], s: torch.Tensor,
                head_dim: int | None = None, start: int = 0) -> None:
    """Divide ``fc1``'s output rows ``start:start + len(s)`` (and bias) by ``s``; multiply ``fc2s``'
    matching columns by it. ``start`` > 0 or a shorter ``s`` addresses the slice of a fused producer
    (the values of a ``qkv_proj``, the up half of a ``gate_up_proj``) that the consumers read."""
    if start < 0 or start + s.numel() > fc1.out_features:
        raise ValueError(f"scale_fc_fc: {s.numel()} scales from row {start} for a producer with "
                         f"{fc1.out_features} outputs")
    s = s.to(fc1.weight.device, torch.float32)
    rows = slice(start, start + s.numel())
    fc1.weight[rows].copy_((fc1.weight[rows].float() / s[:, None]).to(fc1.weight.dtype))
    if fc1.bias is not None:
        fc1.bias[rows].copy_((fc1.bias[rows].float() / s).to(fc1.bias.dtype))
    for fc2 in fc2s:
        se = expand_scales(s, fc2.in_features, head_dim).to(fc2.weight.device)
        fc2.weight.copy_((fc2.weight.float() * se).to(fc2.weight.dtype))


@torch.no_grad()
def fold_norm_into_fcs(norm: nn.Module, fcs: Sequence[nn.Linear]) -> None:
    """Move a norm's elementwise affine into the following linears (norm becomes gain 1, bias 0)."""
    offset = gain_offset(norm)
    weight = norm.weight
    gain = weight.float() + offset if offset else weight.float()
    bias = getattr(norm, "bias", None)
    for fc in fcs:
        w = fc.weight.float()
        if isinstance(bias, torch.Tensor):
            extra = w @ bias.float().to(w.device)
            if fc.bias is None:
                fc.bias = nn.Parameter(extra.to(fc.weight.dtype))
            else:
                fc.bias.copy_((fc.bias.float() + extra).to(fc.bias.dtype))
        fc.weight.copy_((w * gain.to(w.device)).to(fc.weight.dtype))
    weight.fill_(1.0 - offset)
    if isinstance(bias, torch.Tensor):
        bias.zero_()


def find_head_dim(module: nn.Module) -> int | None:
    """The ``head_dim`` attribute of the first sub-module (or config) that has one, if any."""
    for m in module.modules():
        hd = getattr(m, "head_dim", None)
        if isinstance(hd, int) and hd > 0:
            return hd
        cfg = getattr(m, "config", None)
        hd = getattr(cfg, "head_dim", None) if cfg is not None else None
        if isinstance(hd, int) and hd > 0:
            return hd
    return None
