"""Benchmark: AWQ's clipping kernel on a Llama-3-8B-shaped gate_proj, by tile size and dot precision (GPU only).

Times ``awq.clip_search`` on one ``[14336, 4096]`` bf16 weight with int4 groups of 128 (one scale
candidate's search, as in AWQ's scale search) for each variant of the Triton kernel's rows per program,
warps and ``e C`` precision, and the share of (row, group) choices that equal the default variant's.
Prints one JSON object per variant; not a timed test.

With ``--candidates``: one AWQ scale candidate's weights ``Q(clip(w * s)) / s`` on the same weight with symmetric
int4 groups (the Llama template's), the PyTorch ops (clipping through the clip kernel, then fake quantization and
the division in PyTorch) against the fused path (one kernel: scaling, the clipping search with its grid
parameters, quantization and division), and the old path's parts; checks that both give the same weights. Prints
one JSON object.

    python bench/bench_clip_kernel.py [--candidates]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=14336)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--candidates", action="store_true",
                        help="time AWQ's candidate weights (PyTorch ops against the fused kernels) instead")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs a CUDA device"}))
        return 1
    import triton.testing

    from quark.torch.algorithm.awq import awq
    from quark.torch.algorithm.kernels import clip
    from quark.torch.algorithm.utils.quant import WeightGrid
    from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(args.rows, args.cols, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(4096, args.cols, device="cuda", generator=gen) * (torch.rand(args.cols, device="cuda") * 3 + 0.1)
    cov = awq.group_input_covariance(x.to(torch.bfloat16), args.group)
    if args.candidates:
        grid = WeightGrid(Dtype.int4, QSchemeType.per_group, args.group, True, RoundType.half_even)
        se = (torch.rand(1, args.cols, device="cuda", generator=gen) + 0.5).to(torch.bfloat16)
        _time_candidates(w, se, cov, grid, args.group)
        return 0
    grid = WeightGrid(Dtype.uint4, QSchemeType.per_group, args.group, False, RoundType.half_even)
    scales = torch.rand(1, args.cols, device="cuda") + 0.5
    scaled = (w[None] * scales[:, None, :]).to(torch.bfloat16)
    default = None
    for rows, warps, precision in itertools.product((None, 64, 128), (None, 4, 8), ("tf32x3", "tf32")):
        clip.CLIP_BLOCK_ROWS, clip.CLIP_NUM_WARPS, clip.CLIP_DOT_PRECISION = rows, warps, precision
        try:
            out = awq.clip_search(scaled, cov, grid, input_scales=scales)
            ms = triton.testing.do_bench(lambda: awq.clip_search(scaled, cov, grid, input_scales=scales), rep=200)
        except Exception as error:  # a tile that does not fit the device's registers or shared memory
            print(json.dumps({"block_rows": rows, "warps": warps, "precision": precision,
                              "error": str(error).splitlines()[0][:160]}), flush=True)
            continue
        if default is None:
            default = out
        same = float((out == default).float().mean()) if out.shape == default.shape else None
        print(json.dumps({"block_rows": rows or "default", "warps": warps or "default", "precision": precision,
                          "ms": round(ms, 3), "same_as_default": same,
                          "device": torch.cuda.get_device_name()}), flush=True)
    return 0


def _time_candidates(w: torch.Tensor, se: torch.Tensor, cov: torch.Tensor, grid, group: int) -> None:
    """``--candidates``: the two paths of one candidate's weights and their parts, as one JSON object."""
    import triton.testing

    from quark.torch.algorithm.awq import awq
    from quark.torch.algorithm.kernels.clip import best_clip_steps

    scaled = w[None] * se[:, None, :]
    rows, cols = w.shape
    xg = scaled.reshape(1, rows, cols // group, group)
    lo, hi = (t.float() for t in torch.aminmax(xg, dim=-1))
    max0 = torch.maximum(-lo, hi)
    ratios = awq._clip_ratios(w.device)
    scale, zp = awq._clipped_qparams(lo[:, None], hi[:, None], max0[:, None] * ratios[None, :, None, None], grid, None)
    covs = awq._candidate_covariances(cov, se)
    ms = {
        "pytorch_ops": triton.testing.do_bench(lambda: awq._candidate_weights_torch(scaled, se, cov, grid), rep=300),
        "fused": triton.testing.do_bench(lambda: awq._fused_candidate_weights(w, se, covs, grid), rep=300),
        "part_scale_weights": triton.testing.do_bench(lambda: w[None] * se[:, None, :], rep=100),
        "part_aminmax": triton.testing.do_bench(lambda: torch.aminmax(xg, dim=-1), rep=100),
        "part_clip_kernel": triton.testing.do_bench(
            lambda: best_clip_steps(xg, max0, scale, zp, ratios, awq._candidate_covariances(cov, se), grid), rep=300),
    }
    same = torch.equal(awq._candidate_weights_torch(scaled, se, cov, grid),
                       awq._fused_candidate_weights(w, se, covs, grid))
    # the candidates' kernel holds ~180 registers a thread at 32 rows (one 8-warp program per SM) where the clip
    # kernel holds 128 (two): 16 rows a program fits 128 with a few bytes spilled
    from quark.torch.algorithm.kernels import clip

    for rows_per_program in (16, 64):
        clip.CLIP_BLOCK_ROWS = rows_per_program
        try:
            ms[f"fused_{rows_per_program}_rows"] = triton.testing.do_bench(
                lambda: awq._fused_candidate_weights(w, se, covs, grid), rep=300)
        except Exception as error:  # a tile that does not fit the device
            ms[f"fused_{rows_per_program}_rows"] = None
            print(json.dumps({"rows": rows_per_program, "error": str(error).splitlines()[0][:160]}), flush=True)
        finally:
            clip.CLIP_BLOCK_ROWS = None
    print(json.dumps({"ms": {k: None if v is None else round(v, 3) for k, v in ms.items()}, "bit_identical": same,
                      "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
