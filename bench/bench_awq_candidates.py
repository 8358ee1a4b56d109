"""Benchmark: one AWQ scale candidate's weights ``Q(clip(w * s)) / s`` on a Llama-3-8B-shaped gate_proj (GPU only).

Times the PyTorch ops (clipping through the Triton clip kernel, then fake quantization and the division in
PyTorch) against the fused path (the clip kernel reading the bf16 candidates, one kernel for the rest), and
their parts, on one ``[14336, 4096]`` bf16 weight with symmetric int4 groups of 128, and checks that both give
the same weights. Prints one JSON object; not a timed test.

    python bench/bench_awq_candidates.py
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=14336)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--group", type=int, default=128)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs a CUDA device"}))
        return 1
    import triton.testing

    from quark.torch.algorithm.awq import awq
    from quark.torch.algorithm.kernels.clip import best_clip_steps
    from quark.torch.algorithm.utils.quant import WeightGrid
    from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(args.rows, args.cols, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(4096, args.cols, device="cuda", generator=gen) * (torch.rand(args.cols, device="cuda") * 3 + 0.1)
    cov = awq.group_input_covariance(x.to(torch.bfloat16), args.group)
    grid = WeightGrid(Dtype.int4, QSchemeType.per_group, args.group, True, RoundType.half_even)
    se = (torch.rand(1, args.cols, device="cuda", generator=gen) + 0.5).to(torch.bfloat16)
    scaled = w[None] * se[:, None, :]
    groups = args.cols // args.group
    xg = scaled.reshape(1, args.rows, groups, args.group)
    lo, hi = (t.float() for t in torch.aminmax(xg, dim=-1))
    max0 = torch.maximum(-lo, hi)
    ratios = 1 - torch.arange(awq.CLIP_STEPS, device="cuda", dtype=torch.float32) / awq.N_GRID
    scale, zp = awq._clipped_qparams(lo[:, None], hi[:, None], max0[:, None] * ratios[None, :, None, None], grid, None)
    ms = {
        "pytorch_ops": triton.testing.do_bench(lambda: awq._candidate_weights_torch(scaled, se, cov, grid), rep=300),
        "fused": triton.testing.do_bench(lambda: awq._fused_candidate_weights(scaled, cov, grid, se), rep=300),
        "part_scale_weights": triton.testing.do_bench(lambda: w[None] * se[:, None, :], rep=100),
        "part_aminmax": triton.testing.do_bench(lambda: torch.aminmax(xg, dim=-1), rep=100),
        "part_clip_kernel": triton.testing.do_bench(
            lambda: best_clip_steps(xg, max0, scale, zp, ratios, cov, grid, se), rep=300),
    }
    same = torch.equal(awq._candidate_weights_torch(scaled, se, cov, grid),
                       awq._fused_candidate_weights(scaled, cov, grid, se))
    print(json.dumps({"ms": {k: round(v, 3) for k, v in ms.items()}, "bit_identical": same,
                      "device": torch.cuda.get_device_name()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
