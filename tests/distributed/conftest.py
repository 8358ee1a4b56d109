"""Spawning gloo ranks for the data-parallel tests: free port, hard timeouts, results through files."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from tests.distributed.workers import run_rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(job: Callable[[int, Path, dict], None], out: Path, world: int = 2, timeout_s: float = 20.0,
                wait_s: float = 120.0, backend: str = "gloo") -> list[dict[str, Any]]:
    """Run ``job`` on ``world`` gloo ranks; each rank's report (``value``: what the job recorded, ``error`` if it
    raised, ``exitcode``).

    The process group's timeout is ``timeout_s``; a rank still alive after ``wait_s`` is killed and the
    test fails, so a hang never blocks CI.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=run_rank, args=(r, world, port, str(out), job, timeout_s, backend))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {wait_s} s"
    results = []
    for r, p in enumerate(procs):
        path = out / f"rank{r}.pt"
        result = torch.load(path, weights_only=False) if path.exists() else {}
        result["exitcode"] = p.exitcode
        results.append(result)
    return results
