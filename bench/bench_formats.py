"""Benchmark: ``formats.quantize`` / ``formats.fake_quantize`` by step size, as ratios in one process.

Both functions take a tensor through their float32 arithmetic a few rows at a time
(``formats.affine.CHUNK_ELEMENTS`` elements on a GPU, ``CPU_CHUNK_ELEMENTS`` on the CPU). For each step
size this times, on Llama-3-8B-shaped tensors, the int4 g128 codes of a down_proj weight (what ``freeze``
does), its fake-quantized values (what calibration forwards do), and an fp8 per-tensor fake-quantized
activation batch, and prints one JSON object per step size with each time (the best of ``--repeats``) and its
ratio to the ``--baseline`` step size's (results are identical at every step size: the same arithmetic per
element).

    python bench/bench_formats.py                       # CPU, 8B shapes
    python bench/bench_formats.py --device cuda
    python bench/bench_formats.py --rows 64 --repeats 1 # a small check that runs anywhere
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable

import torch
from bench_gptq import best_time  # this folder is the script's import path

from quark.torch.quantization import formats
from quark.torch.quantization.formats import affine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=4096, help="down_proj weight rows (Llama-3-8B: 4096)")
    parser.add_argument("--steps", default="24,22,20,18", help="step sizes as powers of two, comma-separated")
    parser.add_argument("--baseline", type=int, default=24, help="the step size (power of two) ratios refer to")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    if args.baseline not in steps:
        parser.error(f"--baseline {args.baseline} is not one of --steps {args.steps}")
    device = torch.device(args.device)
    gen = torch.Generator(device).manual_seed(0)
    inner = max(128, 7 * args.rows // 2 // 128 * 128)  # down_proj's inputs: 3.5 times its rows (groups of 128)
    weight = torch.randn(args.rows, inner, generator=gen, device=device).to(torch.bfloat16)
    scale = weight.float().abs().reshape(args.rows, inner // 128, 128).amax(-1) / 7
    act = torch.randn(2 * args.rows, args.rows, generator=gen, device=device).to(torch.bfloat16)
    act_scale = torch.tensor(0.01, device=device)
    group = dict(qscheme="per_group", ch_axis=1, group_size=128)
    cases: dict[str, Callable[[], torch.Tensor]] = {
        "int4_g128_quantize_s": lambda: formats.quantize(weight, scale, None, "int4", **group),
        "int4_g128_fake_quantize_s": lambda: formats.fake_quantize(weight, scale, None, "int4", **group),
        "fp8_activation_fake_quantize_s": lambda: formats.fake_quantize(act, act_scale, None, "fp8_e4m3",
                                                                        qscheme="per_tensor"),
    }
    saved = affine.CHUNK_ELEMENTS, affine.CPU_CHUNK_ELEMENTS
    rows: dict[int, dict[str, float]] = {}
    try:
        for step in steps:
            affine.CHUNK_ELEMENTS = affine.CPU_CHUNK_ELEMENTS = 1 << step
            rows[step] = {name: best_time(fn, args.repeats, device) for name, fn in cases.items()}
    finally:
        affine.CHUNK_ELEMENTS, affine.CPU_CHUNK_ELEMENTS = saved
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    for step, times in rows.items():
        row: dict[str, object] = {"step_elements": 1 << step, "device": name, "torch_threads": torch.get_num_threads(),
                                  "weight_shape": [args.rows, inner], "activation_shape": list(act.shape)}
        for key, seconds in times.items():
            row[key] = round(seconds, 5)
            row[key[:-len("_s")] + "_over_baseline"] = round(seconds / rows[args.baseline][key], 3)
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
