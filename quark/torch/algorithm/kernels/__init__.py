"""Triton kernels for the weight algorithms' hot loops, each with a plain-PyTorch twin.

- :mod:`.clip`: AWQ's clipping search (every shrink ratio of every (row, group) judged through the
  group's input covariance) in one pass over the weight instead of ~25 tensor passes per ratio.
- :mod:`.columns`: GPTQ's sequential column loop over one block, one program per tile of rows
  (rows are independent given the inverse Hessian) instead of ~7 kernel launches per column.
- :mod:`.error`: AWQ's squared output error of a scale candidate, ``Σ (out - reference)²`` read once from
  the half-precision outputs instead of five float32 passes.

They run only on CUDA tensors of integer grids, when Triton imports and :data:`USE_TRITON` is on;
everything else takes the PyTorch path, which stays the reference the kernels are tested against
(``tests/algorithm/test_kernels.py``: equal up to float summation order). ``QUARK_TRITON=0`` turns
them off; ``QUARK_TRITON=interpret`` runs them on any device through Triton's interpreter (with
``TRITON_INTERPRET=1`` set before Triton is imported), for testing without a GPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from quark.torch.algorithm.kernels.warmup import KernelWarmup, warming_up
from quark.torch.algorithm.utils.quant import WeightGrid
from quark.torch.quantization.config.type import RoundType
from quark.torch.quantization.formats.affine import get_integer_division

try:  # Triton comes with CUDA builds of PyTorch; CPU builds run the PyTorch paths
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

USE_TRITON = os.environ.get("QUARK_TRITON", "1") != "0"  # read at call time

logger = logging.getLogger(__name__)
T = TypeVar("T")
_FAILED: dict[str, str] = {}  # kernel name -> why it is no longer tried in this process

#: RoundType -> the kernels' rounding code (see :func:`.grid.round_to_grid`)
ROUND_CODES = {RoundType.half_even: 0, RoundType.round: 1, RoundType.floor: 2}


def kernels_apply(t: torch.Tensor, grid: WeightGrid) -> bool:
    """Whether the Triton kernels take ``t`` on ``grid``: an integer grid (not a block or float format),
    Triton installed and enabled, and ``t`` on CUDA (any device under ``QUARK_TRITON=interpret``)."""
    if grid.is_block or grid.is_float or grid.round_method not in ROUND_CODES:
        return False
    return triton_applies(t)


def triton_applies(t: torch.Tensor) -> bool:
    """Whether a Triton kernel takes ``t``: Triton installed and enabled, and ``t`` on CUDA (any device under
    ``QUARK_TRITON=interpret``)."""
    return HAVE_TRITON and USE_TRITON and (t.is_cuda or os.environ.get("QUARK_TRITON") == "interpret")


def grid_arguments(grid: WeightGrid) -> dict[str, object]:
    """The integer grid's arguments of every kernel that rounds (:func:`.grid.fake_quant_int`): its range,
    rounding, whether it has a zero point, and the process's integer division mode."""
    return dict(qmin=float(grid.qmin), qmax=float(grid.qmax), METHOD=ROUND_CODES[grid.round_method],
                ZERO_FREE=grid.zero_point_free, EXACT=get_integer_division() == "exact")


def kernel_group_size(gs: int) -> bool:
    """Group sizes the kernels tile (a power of two from 16 to 256; per-channel rows are too long)."""
    return 16 <= gs <= 256 and gs & (gs - 1) == 0


def kernel_or_twin(name: str, kernel: Callable[[], T], twin: Callable[[], T]) -> T:
    """``kernel()``, or its PyTorch ``twin()`` when the kernel cannot run here (Triton cannot compile it for
    this device or version): logged once, and the twin serves the rest of the process. Running out of
    device memory is not such a failure and propagates (the runner retries the layer with less)."""
    if name in _FAILED:
        return twin()
    if warming_up():  # compiling ahead (warmup.py): a failure is the real call's to handle
        return kernel()
    try:
        return kernel()
    except torch.OutOfMemoryError:
        raise
    except Exception as error:
        _FAILED[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        logger.warning("Triton kernel %s failed (%s); using its PyTorch twin from here on", name, _FAILED[name])
        return twin()


def start_warmup(device: torch.device | str, name: str,
                 make_calls: Callable[[torch.device], Sequence[Callable[[], object]]]) -> KernelWarmup | None:
    """A step's ``prepare``: a :class:`~.warmup.KernelWarmup` of ``make_calls(device)`` on a CUDA ``device`` whose
    Triton kernels apply; None elsewhere, or when there is nothing to compile."""
    device = torch.device(device)
    if device.type != "cuda" or not triton_applies(torch.empty(0, device=device)):
        return None
    calls = make_calls(device)
    return KernelWarmup(calls, device, name) if calls else None
