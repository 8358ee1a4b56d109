"""Collectives over ``torch.distributed`` ranks, and nothing when there is one process (layer 6).

Every statistic the calibration gathers (observer ranges, Hessians, activation statistics, search
losses) goes through these functions, so a one-process run and an N-process run under an
initialised process group (``torchrun``) share one code path. With no process group, or a group of
one rank, each function returns its input unchanged and costs nothing.

Tensors are reduced where the backend can take them: NCCL needs CUDA tensors, gloo CPU tensors; a
tensor elsewhere travels to the backend's device and back, keeping its dtype.

A collective that fails (a rank died, or waited past the process group's timeout) raises
:class:`RankFailure`, naming what was being reduced, instead of the backend's bare error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "RankFailure",
    "active",
    "all_gather_cat",
    "all_reduce_",
    "broadcast_",
    "check_same",
    "digest",
    "gather_objects",
    "init_from_env",
    "owners_by_rows",
    "rank",
    "reduce_observers",
    "shard",
    "split_batches",
    "verify_identical",
    "world_size",
]

T = TypeVar("T")

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}

#: Seconds a collective waits for the other ranks before failing (``init_from_env``'s default): a rank that
#: died or hangs makes the others fail within this time instead of waiting forever.
DEFAULT_TIMEOUT_S = 600.0


class RankFailure(RuntimeError):
    """A collective could not complete: another rank died, raised, or did not arrive within the timeout."""


def active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def init_from_env(device: torch.device | str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Initialise the process group from ``torchrun``'s environment (``WORLD_SIZE`` > 1); returns whether
    this call initialised it (False without ``torchrun`` or when a group exists already).

    The backend is NCCL when ``device`` is a CUDA device (each rank then computes on
    ``cuda:LOCAL_RANK``), gloo otherwise.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True


def _backend_device(tensor: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return tensor.device if tensor.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _failed(what: str, error: BaseException) -> RankFailure:
    return RankFailure(f"rank {dist.get_rank()} of {dist.get_world_size()}: the collective '{what}' failed, so "
                       f"another rank died, raised, or did not arrive within the process group's timeout; this "
                       f"rank stops too, and nothing is written ({type(error).__name__}: {error})")


def _guarded(what: str, run: Callable[[], T]) -> T:
    try:
        return run()
    except (RuntimeError, dist.DistError) as error:  # DistBackendError, gloo's connection errors, timeouts
        if isinstance(error, RankFailure):
            raise
        raise _failed(what, error) from error


def _collective(tensor: torch.Tensor, run: Callable[[torch.Tensor], Any], what: str) -> torch.Tensor:
    device = _backend_device(tensor)
    if tensor.device == device and tensor.is_contiguous():
        _guarded(what, lambda: run(tensor))
        return tensor
    moved = tensor.detach().to(device).contiguous()
    _guarded(what, lambda: run(moved))
    tensor.copy_(moved)
    return tensor


def all_reduce_(tensor: torch.Tensor, op: str = "sum", what: str = "all_reduce") -> torch.Tensor:
    """Reduce ``tensor`` in place over every rank (``op``: ``sum``, ``min`` or ``max``); returns it."""
    if op not in _OPS:
        raise ValueError(f"all_reduce_(op={op!r}) is not one of: {', '.join(_OPS)}")
    if not active():
        return tensor
    return _collective(tensor, lambda t: dist.all_reduce(t, op=_OPS[op]), what)


def broadcast_(tensor: torch.Tensor, src: int, what: str = "broadcast") -> torch.Tensor:
    """``tensor`` overwritten in place with rank ``src``'s (every rank passes one of the same shape and dtype)."""
    if not active():
        return tensor
    return _collective(tensor, lambda t: dist.broadcast(t, src), what)


def gather_objects(obj: Any, what: str = "gather") -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order (``[obj]`` without a process group)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    _guarded(what, lambda: dist.all_gather_object(out, obj))
    return out


def all_gather_cat(tensor: torch.Tensor, what: str = "all_gather") -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (the first dims may differ)."""
    if not active():
        return tensor
    sizes = gather_objects(int(tensor.shape[0]), what)
    longest = max(sizes)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=_backend_device(tensor))
    padded[: tensor.shape[0]] = tensor.to(padded.device)
    parts = [torch.empty_like(padded) for _ in sizes]
    _guarded(what, lambda: dist.all_gather(parts, padded))
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(tensor.device)


def owners_by_rows(rows: Sequence[int], ranks: int) -> list[int]:
    """The rank that computes each of several row-independent pieces of work (linears of ``rows`` rows each):
    the largest first, each to the rank with the fewest rows so far (the lowest such rank), so the ranks'
    rows are balanced."""
    load = [0] * ranks
    owners = [0] * len(rows)
    for i in sorted(range(len(rows)), key=lambda i: -rows[i]):
        owner = min(range(ranks), key=lambda r: load[r])
        owners[i] = owner
        load[owner] += rows[i]
    return owners


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: a contiguous slice, the first ranks taking one more when the
    count does not divide (all of ``items`` without a process group)."""
    n, ranks, me = len(items), world_size(), rank()
    base, extra = divmod(n, ranks)
    start = me * base + min(me, extra)
    return list(items[start:start + base + (1 if me < extra else 0)])


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value (dict keys sorted; other objects by ``str``)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same(facts: Mapping[str, Any], owner: str) -> list[dict[str, Any]]:
    """All-gather ``facts`` and raise ``ValueError`` naming each fact that differs and every rank's value.

    Returns every rank's facts (rank order). Nothing happens without a process group.
    """
    every = gather_objects(dict(facts), f"{owner}: compare ranks")
    problems = []
    for key in facts:
        values = [f.get(key) for f in every]
        if any(v != values[0] for v in values[1:]):
            shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            problems.append(f"{key} differs ({shown})")
    if problems:
        raise ValueError(f"{owner}: the {len(every)} ranks of the process group disagree before any work: "
                         + "; ".join(problems) + ". Every rank must run the same model, config and calibration "
                         "data (each rank's share when the data is given already split)")
    return every


def reduce_observers(observers: Sequence[Any], owner: str = "calibration") -> None:
    """Combine every rank's observer statistics so each rank holds those of all the ranks' data.

    One all-gather first tells each observer the statistics' shape on every rank, so a rank whose data
    never reached an observer (a mixture-of-experts expert the router did not pick there) contributes
    empty statistics; an observer no rank fed stays empty (``finalize`` names it on every rank). Then
    each observer reduces its own statistics (``ObserverBase.reduce``).
    """
    if not active() or not observers:
        return
    shapes = [o.statistics_shape() for o in observers]
    every = gather_objects(shapes, f"{owner}: observer statistics shapes")
    for index, observer in enumerate(observers):
        seen = [s[index] for s in every]
        known = {s for s in seen if s is not None}
        if len(known) > 1:
            shown = ", ".join(f"rank {r}: {s}" for r, s in enumerate(seen))
            raise ValueError(f"{owner}: {type(observer).__name__} #{index} recorded statistics of different "
                             f"shapes on different ranks ({shown}); every rank must run the same model")
        if not known:
            continue
        if shapes[index] is None:
            observer.empty_statistics(known.pop())
        what = f"{owner}: {type(observer).__name__} statistics"
        observer.reduce(lambda t, op, _what=what: all_reduce_(t, op, _what))


#: Elements of a tensor one float64 sum of :func:`_fingerprint` takes (on CUDA ``sum(dtype=float64)``
#: converts its input first: an 8B model's lm_head would need 4 GiB at once).
FINGERPRINT_SLICE = 1 << 24


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Three float64 sums of ``tensor``'s values (all, every 7th, every 13th from the 4th): a changed value
    changes them; summed ``FINGERPRINT_SLICE`` elements at a time, so no float64 copy of the whole tensor is
    made."""
    t = tensor.detach()
    if t.dtype.is_floating_point and t.element_size() == 1:  # fp8: sum the bit patterns
        t = t.view(torch.uint8)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    flat = t.reshape(-1)
    sums = torch.zeros(3, dtype=torch.float64, device=flat.device)
    for s0 in range(0, max(flat.numel(), 1), FINGERPRINT_SLICE):
        piece = flat[s0:s0 + FINGERPRINT_SLICE]
        # every 7th / 13th-from-the-4th element of the whole tensor, as positions within this slice
        sums += torch.stack([piece.sum(dtype=torch.float64), piece[(-s0) % 7::7].sum(dtype=torch.float64),
                             piece[(3 - s0) % 13::13].sum(dtype=torch.float64)])
    return sums.cpu()


def verify_identical(model: torch.nn.Module, owner: str = "quantize_model") -> None:
    """Raise ``RuntimeError`` when any parameter or buffer of ``model`` differs between ranks.

    Each rank computes three float64 sums per tensor (over all values and over two strided subsets)
    and they are all-gathered: a changed value anywhere changes them (but for a float64 rounding).
    Decisions (AWQ scales, GPTQ columns, ranges) are computed on every rank from identical reduced
    statistics; this checks that they came out identical.
    """
    if not active():
        return
    names, sums = [], []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor is None or tensor.device.type == "meta":
            continue
        names.append(name)
        sums.append(_fingerprint(tensor))
    mine = torch.stack(sums) if sums else torch.zeros(0, 3, dtype=torch.float64)
    every = gather_objects(mine, f"{owner}: compare the results of every rank")
    for r, theirs in enumerate(every):
        if theirs.shape != mine.shape:
            raise RuntimeError(f"{owner}: rank {r} holds {theirs.shape[0]} tensors, rank {rank()} {mine.shape[0]}")
        differ = (theirs != mine).any(-1).nonzero().flatten().tolist()
        if differ:
            listed = ", ".join(names[i] for i in differ[:5])
            raise RuntimeError(f"{owner}: the ranks' results differ ({len(differ)} tensors, e.g. {listed}; rank {r} "
                               f"against rank {rank()}): a reduction is missing or a rank ran other code")


def _shapes(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return list(batch.shape)
    if isinstance(batch, Mapping):
        return {str(k): _shapes(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [_shapes(v) for v in batch]
    return type(batch).__name__


def split_batches(batches: Sequence[T], facts: Mapping[str, Any], already_split: bool = False,
                  owner: str = "quantize_model") -> list[T]:
    """This rank's calibration batches, after checking that every rank runs the same job.

    ``facts`` (e.g. digests of the config and of the model's structure) must agree on every rank.
    Without ``already_split`` every rank must pass the same batches (their count and shapes are
    compared) and takes its :func:`shard`; with it each rank passed its own share, which must not
    be empty. Nothing happens without a process group.
    """
    if not active():
        return list(batches)
    facts = dict(facts)
    if not already_split:
        facts["calibration batches"] = len(batches)
        facts["calibration batch shapes"] = digest([_shapes(b) for b in batches])
    every = check_same(facts, owner)
    if already_split:
        counts = gather_objects(len(batches), f"{owner}: batch counts")
        empty = [r for r, n in enumerate(counts) if n == 0]
        if empty and len(empty) < len(counts):
            raise ValueError(f"{owner}: rank(s) {empty} got no calibration batch; with the data already split "
                             "every rank needs at least one batch")
        return list(batches)
    if batches and len(batches) < len(every):
        raise ValueError(f"{owner}: {len(batches)} calibration batch(es) cannot be split over {len(every)} ranks; "
                         f"pass at least {len(every)} (or run fewer ranks)")
    return shard(batches)
