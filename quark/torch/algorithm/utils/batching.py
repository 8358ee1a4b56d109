"""Recorded module calls merged along the batch dimension, so a search runs a few large forwards.

AWQ and AutoSmoothQuant evaluate a module (``self_attn``, ``mlp``, ...) on every recorded
calibration call once per grid point; with 128 one-sample calls that is thousands of tiny
forwards per layer, bound by kernel launches on a GPU. Calls are merged when each tensor
argument either has the call's batch size as its first dimension (concatenated) or is the same
in every call (kept once); anything else keeps the calls as recorded.
"""

from __future__ import annotations

from typing import Any

import torch

Call = tuple[tuple, dict]

#: Tokens (batch × sequence) per merged call: bounds the search's activation memory.
MERGE_TOKENS = 16384


def _first_tensor(call: Call) -> torch.Tensor | None:
    args, kwargs = call
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def _merge_value(values: list[Any], batches: list[int]) -> tuple[bool, Any]:
    """``(ok, merged)`` for one argument position across calls."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in values):
            return False, None
        if all(v.dim() > 0 and v.shape[0] == b for v, b in zip(values, batches)) and all(
                v.shape[1:] == first.shape[1:] for v in values):
            return True, torch.cat(values, 0)
        if all(v.shape == first.shape and (v is first or torch.equal(v, first)) for v in values):
            return True, first
        return False, None
    if isinstance(first, (tuple, list)):
        if not all(isinstance(v, type(first)) and len(v) == len(first) for v in values):
            return False, None
        merged = []
        for i in range(len(first)):
            ok, m = _merge_value([v[i] for v in values], batches)
            if not ok:
                return False, None
            merged.append(m)
        return True, type(first)(merged)
    if all(v is first for v in values):
        return True, first
    try:
        return bool(all(v == first for v in values)), first
    except (RuntimeError, TypeError, ValueError):
        return False, None


def _merge_group(calls: list[Call]) -> Call | None:
    batches = []
    for call in calls:
        t = _first_tensor(call)
        if t is None or t.dim() < 2:
            return None
        batches.append(t.shape[0])
    args0, kwargs0 = calls[0]
    if any(len(a) != len(args0) or k.keys() != kwargs0.keys() for a, k in calls):
        return None
    ok, args = _merge_value([a for a, _ in calls], batches)
    if not ok:
        return None
    merged_kwargs = {}
    for key in kwargs0:
        ok, value = _merge_value([k[key] for _, k in calls], batches)
        if not ok:
            return None
        merged_kwargs[key] = value
    return tuple(args), merged_kwargs


def merge_calls(calls: list[Call], max_tokens: int = MERGE_TOKENS) -> list[Call] | None:
    """The calls merged into chunks of at most ``max_tokens`` tokens, or None if they cannot merge."""
    if len(calls) < 2:
        return None
    sizes = []
    for call in calls:
        t = _first_tensor(call)
        if t is None or t.dim() < 2:
            return None
        sizes.append(t.shape[0] * t.shape[1])
    merged: list[Call] = []
    chunk: list[Call] = []
    tokens = 0
    for call, size in zip(calls, sizes):
        if chunk and tokens + size > max_tokens:
            group = _merge_group(chunk) if len(chunk) > 1 else chunk[0]
            if group is None:
                return None
            merged.append(group)
            chunk, tokens = [], 0
        chunk.append(call)
        tokens += size
    group = _merge_group(chunk) if len(chunk) > 1 else chunk[0]
    if group is None:
        return None
    merged.append(group)
    return merged if len(merged) < len(calls) else None
