"""Compiling the Triton kernels before their first use, in background threads.

Triton compiles a kernel the first time it is launched with a new specialisation (the dtypes, the
constexpr arguments, and for each integer argument whether it is 1, a multiple of 16 or neither), and
caches the result on disk. On a machine whose cache is empty that made AWQ's first decoder layer wait
~6.5 s on an H100 (8B shape): the clip, candidate and error kernels compiled one after another, each
the moment the search first needed it. A step's ``prepare`` hands :class:`KernelWarmup` the same calls
its first layer will make, on tiny inputs with the same specialisation (:func:`specialised_size`); they
run in threads (Triton's compiler passes and ``ptxas`` release the GIL) while the runner captures the
decoder's inputs, and the step waits for them before its first kernel launch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch

logger = logging.getLogger(__name__)

#: Threads compiling at once (a compile is mostly single-threaded C++ and a ``ptxas`` process).
MAX_THREADS = 8

_local = threading.local()


def warming_up() -> bool:
    """Whether this thread is running a warm-up call (``kernel_or_twin`` then neither falls back nor remembers
    a failure: the real call decides)."""
    return bool(getattr(_local, "on", False))


def specialised_size(n: int) -> int:
    """A small size that Triton specialises like ``n``: 1, a multiple of 16, or neither."""
    if n == 1:
        return 1
    return 16 if n % 16 == 0 else 17


def _driver_ready(device: torch.device) -> bool:
    """Start Triton's driver for a CUDA ``device`` (its C module, compiled on first use where the cache is empty,
    which every kernel launch shares); whether it is up."""
    if device.type != "cuda":
        return False
    try:
        import triton

        triton.runtime.driver.active.get_current_device()
    except Exception as error:  # the first warm-up call then starts it, alone
        logger.debug("Triton's driver did not start ahead of the warm-up (%s: %s)", type(error).__name__, error)
        return False
    return True


class KernelWarmup:
    """Runs ``calls`` (each launching kernels on tiny tensors of ``device``) in background threads.

    Triton's driver starts first, alone (the compilations share it); then every call runs in parallel, so the
    warm-up lasts about as long as its longest compilation. Where the driver cannot be started on its own, the
    first call runs alone (starting it) and the rest in parallel. A call that fails is logged and skipped: the
    real launch compiles (or falls back) as it would have. :meth:`wait` blocks until every call is done.
    """

    def __init__(self, calls: Sequence[Callable[[], object]], device: torch.device | str, name: str) -> None:
        self.name = name
        self.device = torch.device(device)
        self._calls = list(calls)
        self._thread = threading.Thread(target=self._run, name=f"quark-{name}-warmup", daemon=True)
        self._started = time.perf_counter()
        self._thread.start()

    def _attempt(self, call: Callable[[], object]) -> None:
        _local.on = True
        try:
            with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
                call()
        except Exception as error:  # the real launch reports what matters
            logger.debug("%s: kernel warm-up call failed (%s: %s)", self.name, type(error).__name__, error)
        finally:
            _local.on = False

    def _run(self) -> None:
        if not self._calls:
            return
        rest = self._calls
        if not _driver_ready(self.device):
            self._attempt(self._calls[0])
            rest = self._calls[1:]
        if rest:
            with ThreadPoolExecutor(min(len(rest), MAX_THREADS), thread_name_prefix=f"quark-{self.name}") as pool:
                list(pool.map(self._attempt, rest))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the tiny launches are done before their tensors go

    def wait(self) -> None:
        """Block until the warm-up is done (logs how long it took and how long this call waited)."""
        start = time.perf_counter()
        self._thread.join()
        logger.debug("%s: %d kernel warm-up calls done %.2fs after they started (waited %.2fs)", self.name,
                     len(self._calls), time.perf_counter() - self._started, time.perf_counter() - start)


def finished(warmup: KernelWarmup | None) -> None:
    """Wait for ``warmup`` where there is one; the step then drops it (``self._warmup = None``), so later launches
    neither wait nor log again."""
    if warmup is not None:
        warmup.wait()

