"""Calibration batches: what a dataloader may yield and how it is fed to a model.

Accepted items: a LongTensor of token ids (``[seq]`` or ``[batch, seq]``), a mapping of tensors
(``input_ids``, ``attention_mask``, ...), or a list/tuple whose first item is the token ids.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quark.torch.quantization.calibration import batching

logger = logging.getLogger(__name__)


def materialize(dataloader: Iterable[Any] | None, *, required: bool) -> list[Any]:
    """Read every batch once (so algorithms can replay them); reject empty or exhausted loaders."""
    if dataloader is None:
        if required:
            raise ValueError("calib_dataloader is None, but this config needs calibration data "
                             "(static activation quantization or an algorithm); pass a DataLoader")
        return []
    if isinstance(dataloader, (torch.Tensor, Mapping)):
        raise ValueError(f"calib_dataloader must be an iterable of batches (e.g. a DataLoader), got a "
                         f"{type(dataloader).__name__}; wrap it: DataLoader(tensor)")
    batches = list(dataloader)
    if not batches:
        raise ValueError("calib_dataloader is empty (or an already exhausted iterator): it yielded no "
                         "batch; pass a DataLoader with at least one batch")
    for index, batch in enumerate(batches):
        _check_batch(batch, index)
    return batches


def _check_batch(batch: Any, index: int) -> None:
    if isinstance(batch, torch.Tensor):
        return
    if isinstance(batch, Mapping):
        if not any(isinstance(v, torch.Tensor) for v in batch.values()):
            raise ValueError(f"calibration batch {index} is a mapping without tensors "
                             f"(keys: {sorted(batch)}); expected e.g. {{'input_ids': tensor}}")
        return
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return
    raise ValueError(f"calibration batch {index} has type {type(batch).__name__}; expected a tensor of "
                     "token ids, a dict of tensors, or a list/tuple whose first item is a tensor")


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def model_inputs(batch: Any, device: torch.device, index: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) for ``model(*args, **kwargs)``, tensors moved to ``device``; 1-D ids get a batch dim.

    ``index`` is the batch's position, for the error message when the batch has an unknown form.
    """
    _check_batch(batch, index)
    if isinstance(batch, torch.Tensor):
        ids = batch.unsqueeze(0) if batch.dim() == 1 else batch
        return (ids.to(device),), {}
    if isinstance(batch, Mapping):
        return (), {k: _to(v, device) for k, v in batch.items()}
    ids = batch[0]
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    return (ids.to(device),), {}


def model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _accepts_use_cache(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "use_cache")


@torch.no_grad()
def run_batches(model: nn.Module, batches: list[Any], desc: str = "Calibrating",
                merge: bool = False, forget: Callable[[], None] | None = None) -> None:
    """Forward every batch through ``model`` (no grad, KV cache off) with a progress bar.

    With ``merge`` (the caller knows that its observers record the same statistics from a merged
    batch as from its parts, and from a batch seen twice) the batches run merged along the batch
    dimension on an accelerator (:mod:`batching`). The first two batches check it: merged, then
    one by one; when their outputs differ (or cannot be compared), ``forget`` clears what the check
    recorded and every batch runs as given. A merged forward that runs out of device memory
    leaves the remaining batches to run as given.
    """
    device = model_device(model)
    extra = {"use_cache": False} if _accepts_use_cache(model) else {}
    if merge and len(batches) > 2 and batching.merging_enabled(device):
        calls = []
        for index, batch in enumerate(batches):
            args, kwargs = model_inputs(batch, device, index)
            calls.append((args, {**extra, **kwargs}))
        max_tokens = min(batching.MERGE_TOKENS, batching.MODEL_MERGE_TOKENS)
        plan = batching.model_pass_runs(calls, max_tokens)
        if plan is not None:
            with tqdm(total=sum(batching.call_batch(c) for c in calls), desc=desc, unit="sample",
                      leave=False) as bar:
                _run_merged(model, calls, plan, max_tokens, bar, forget)
            return
    for index, batch in enumerate(tqdm(batches, desc=desc, unit="batch", leave=False)):
        args, kwargs = model_inputs(batch, device, index)
        model(*args, **{**extra, **kwargs})


class _Unverifiable(Exception):
    """The model's output has no per-sample tensor to compare."""


def _run_merged(model: nn.Module, calls: list[batching.Call], plan: tuple[batching.Call, list[batching.Call]],
                max_tokens: int, bar: Any, forget: Callable[[], None] | None) -> None:
    head, merged_rest = plan
    try:
        same = batching.same_outputs(functools.partial(_fingerprint, model), head, calls[:2])
    except _Unverifiable:
        same = False
    if same:
        bar.update(batching.call_batch(head))
        rest = calls[2:]
        runs = merged_rest if len(merged_rest) < len(rest) else rest
    else:
        logger.info("calibration batches run one by one: merged, the first two did not reproduce their outputs")
        if forget is not None:
            forget()
        rest = runs = calls
    done = 0  # samples of ``rest`` already run
    for args, kwargs in runs:
        try:
            model(*args, **kwargs)
        except torch.OutOfMemoryError:
            if runs is rest:  # nothing merged: a real shortage
                raise
            torch.cuda.empty_cache()
            logger.warning("a merged calibration batch ran out of device memory; running the remaining batches "
                           "one by one (lower batching.MODEL_MERGE_TOKENS=%d to merge fewer)", max_tokens)
            for call in _after(rest, done):
                model(*call[0], **call[1])
                bar.update(batching.call_batch(call))
            return
        size = batching.call_batch((args, kwargs))
        done += size
        bar.update(size)


def _after(calls: list[batching.Call], samples: int) -> list[batching.Call]:
    """The calls after the first ``samples`` samples of ``calls``."""
    seen = 0
    for i, call in enumerate(calls):
        if seen >= samples:
            return calls[i:]
        seen += batching.call_batch(call)
    return []


def _fingerprint(model: nn.Module, call: batching.Call) -> torch.Tensor:
    """Per sample: the mean over positions and the last position of the logits (or plain output)."""
    args, kwargs = call
    out = model(*args, **kwargs)
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise _Unverifiable(type(out).__name__)
    out = out.float()
    if out.dim() == 2:
        return out
    return torch.cat([out.mean(1), out[:, -1]], -1).reshape(out.shape[0], -1)
