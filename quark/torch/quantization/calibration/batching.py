"""Calibration calls merged along the batch dimension, so a layer or module runs a few large forwards.

The layerwise runner feeds each decoder layer every calibration batch several times (collect,
re-collect per GPTQ sub-group, propagate) and AWQ evaluates a module on every recorded call once
per grid point; with 128 one-sample batches that is thousands of tiny forwards per layer, bound
by kernel launches on a GPU. Calls are merged when each tensor argument either has the call's
batch size as its first dimension (concatenated) or is the same in every call (kept once);
anything else keeps the calls as they are. Callers check once that a merged call gives the
outputs of the calls it replaces (:func:`same_outputs`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

Call = tuple[tuple, dict]

#: Tokens (batch × sequence) per merged call, read at each call: bounds the activation memory of
#: a merged forward. 0 runs every calibration batch as given.
MERGE_TOKENS = 16384

#: The same bound for whole-model calibration forwards, which also hold the logits (tokens ×
#: vocabulary); the smaller of the two applies (0 runs them as given).
MODEL_MERGE_TOKENS = 4096

#: Whether calls on a CPU are merged too. Off: a CPU is compute-bound already, and one large forward
#: was slower there (SmolLM2-135M GPTQ, 8 samples, 2 cores: 80 s per batch, 91 s merged).
MERGE_ON_CPU = False

logger = logging.getLogger(__name__)


def merging_enabled(device: torch.device | str) -> bool:
    """Whether calls running on ``device`` should be merged (``MERGE_TOKENS``, ``MERGE_ON_CPU``)."""
    return MERGE_TOKENS > 0 and (torch.device(device).type != "cpu" or MERGE_ON_CPU)


def checked_merge(calls: list[Call], run: Any, verdict: bool | None, device: torch.device | str,
                  what: str) -> tuple[list[Call], bool | None]:
    """``(calls to run, verdict)``: ``calls`` merged when merging is on for ``device`` and allowed.

    ``verdict`` carries the caller's decision between calls: False keeps calls as given, None
    checks once (:func:`same_outputs` on the first merged call, logged when refused), True merges.
    """
    if verdict is False or not merging_enabled(device):
        return calls, verdict
    merged = merge_calls(calls)
    if merged is None:
        return calls, verdict
    if verdict is None:
        verdict = same_outputs(run, merged[0], calls)
        if not verdict:
            logger.info("%s changes its output when calibration calls are merged; running them one by one", what)
    return (merged if verdict else calls), verdict


def model_pass_runs(calls: list[Call], max_tokens: int) -> tuple[Call, list[Call]] | None:
    """``(head, rest)`` of a merged whole-model calibration pass, or None when the calls do not merge.

    ``head`` merges the first two calls (the ones the merge is checked on); ``rest`` the others, in
    chunks of at most ``max_tokens``. Every path that runs a calibration pass merged uses this one
    grouping, so the same matrix shapes (and the same float results) come out of each.
    """
    if len(calls) <= 2:
        return None
    head = merge_calls(calls[:2], max_tokens)
    if head is None or len(head) != 1 or merge_calls(calls, max_tokens) is None:
        return None
    return head[0], merge_calls(calls[2:], max_tokens) or calls[2:]


def call_batch(call: Call) -> int:
    """The batch size of a call: the first dimension of its first tensor argument (1 if none)."""
    t = _first_tensor(call)
    return 1 if t is None or t.dim() == 0 else int(t.shape[0])


def split_like(outputs: list[torch.Tensor], merged: list[Call], sizes: list[int]) -> list[torch.Tensor]:
    """Per-call outputs from the outputs of ``merged``, the merge of calls with batch ``sizes`` (in order)."""
    parts: list[torch.Tensor] = []
    k = 0
    for out, run in zip(outputs, merged):
        n, take = call_batch(run), []
        while n > 0:
            take.append(sizes[k])
            n -= sizes[k]
            k += 1
        parts.extend(out.split(take, 0) if len(take) > 1 else [out])
    if k != len(sizes):
        raise RuntimeError(f"split_like: merged calls cover {k} of {len(sizes)} calls")
    return parts


def same_outputs(run: Any, merged: Call, calls: list[Call]) -> bool:
    """Whether ``run(merged)`` equals the concatenated ``run(call)`` of the calls it replaces.

    Running out of device memory on the merged call also answers False (logged): the caller then
    keeps the calls as they are.
    """
    try:
        first = run(merged).float()
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.warning("a merged calibration batch of %d samples ran out of device memory; running the "
                       "batches one by one (lower batching.MERGE_TOKENS=%d to merge fewer)", call_batch(merged),
                       MERGE_TOKENS)
        return False
    parts, seen = [], 0
    for call in calls:
        if seen >= first.shape[0]:
            break
        out = run(call)
        parts.append(out)
        seen += out.shape[0]
    single = torch.cat(parts, 0).float()
    return first.shape == single.shape and bool((first - single).norm() <= 1e-4 * single.norm() + 1e-12)


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
            rows = _consecutive_rows(values)
            return True, rows if rows is not None else torch.cat(values, 0)
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


def _consecutive_rows(values: list[torch.Tensor]) -> torch.Tensor | None:
    """The rows of one tensor that ``values`` are, in order (views that ``split`` made of it), as one view;
    None when they are not. The layer-by-layer runner splits each merged call's output back into the
    calibration batches: merging them again for the next layer then costs no copy and no memory."""
    base = values[0]._base
    if base is None or base.dim() == 0 or not base.is_contiguous() or base.shape[0] == 0:
        return None
    row = base[0].numel()
    offset = values[0].storage_offset() - base.storage_offset()
    if row == 0 or offset % row:
        return None
    start = taken = offset // row
    for v in values:
        if (v._base is not base or not v.is_contiguous() or v.shape[1:] != base.shape[1:]
                or v.storage_offset() - base.storage_offset() != taken * row):
            return None
        taken += v.shape[0]
    return base.narrow(0, start, taken - start)


def _merge_group(calls: list[Call]) -> Call | None:
    batches = [call_batch(c) for c in calls]
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


def merge_calls(calls: list[Call], max_tokens: int | None = None) -> list[Call] | None:
    """The calls merged into chunks of at most ``max_tokens`` (default ``MERGE_TOKENS``) tokens, or None."""
    max_tokens = MERGE_TOKENS if max_tokens is None else max_tokens
    if len(calls) < 2 or max_tokens <= 0:
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
