"""Benchmark: GPTQ's column loop on one SmolLM2-sized ``down_proj`` (576 × 1536), as ratios.

One JSON row per grid: the best of ``--repeats`` wall times of ``gptq_quantize`` (act-order, static
groups, no clipping search) and of round-to-nearest (``fake_quant_weight``) on the same weight in
the same process, and their ratio. On CUDA also the column loop run eagerly instead of as replayed
CUDA graphs (``columns.USE_CUDA_GRAPHS``), as ``eager_over_graphs``. The Hessian comes from 4,096
random Gaussian tokens.

Usage: ``python bench/bench_gptq.py [--device cpu|cuda] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import torch

from quark.torch.algorithm.gptq import columns
from quark.torch.algorithm.gptq.math import accumulate_hessian, gptq_quantize
from quark.torch.algorithm.utils.quant import WeightGrid, fake_quant_weight
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType

GRIDS = {
    "int4_g64_sym": WeightGrid(Dtype.int4, QSchemeType.per_group, 64, True, RoundType.half_even),
    "uint4_g64_asym": WeightGrid(Dtype.uint4, QSchemeType.per_group, 64, False, RoundType.half_even),
    "fp8_per_tensor": WeightGrid(Dtype.fp8_e4m3, QSchemeType.per_tensor, 1536, True, RoundType.half_even),
}


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(576, 1536, generator=gen).to(device)
    hessian, _ = accumulate_hessian(None, 0, torch.randn(4096, 1536, generator=gen).to(device))
    for name, grid in GRIDS.items():
        def run(g: WeightGrid = grid) -> object:
            return gptq_quantize(weight, hessian, g, desc_act=True, static_groups=True)

        gptq_s = best_time(run, args.repeats, device)
        row: dict[str, object] = {}
        if device.type == "cuda":
            columns.USE_CUDA_GRAPHS = False
            eager_s = best_time(run, args.repeats, device)
            columns.USE_CUDA_GRAPHS = True
            row = {"gptq_eager_seconds": eager_s, "eager_over_graphs": eager_s / gptq_s}
        rtn_grid = grid if grid.qscheme != QSchemeType.per_tensor else None
        rtn_s = best_time(lambda g=rtn_grid: fake_quant_weight(weight, g) if g is not None else
                          weight.to(torch.float8_e4m3fn).float(), args.repeats, device)
        print(json.dumps({"bench": "gptq_loop", "device": str(device), "torch": torch.__version__,
                          "python": platform.python_version(), "grid": name, "shape": [576, 1536],
                          "gptq_seconds": gptq_s, "rtn_seconds": rtn_s, "gptq_over_rtn": gptq_s / rtn_s, **row}),
              flush=True)


if __name__ == "__main__":
    main()
