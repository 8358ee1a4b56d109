"""Benchmark: CPU <-> GPU copy throughput, plain ``Tensor.to`` against page-locked staging (not a timed test).

The layer-by-layer placements move a decoder layer (Llama-3-8B: 436 MB of bf16 weights) and its
activations over the bus at every layer; ``quark.torch.quantization.calibration.transfer`` stages them
through page-locked memory. Prints one JSON object per direction and method (GB/s, mean of 3 after a
warm-up), and the device name.

    python bench/bench_transfer.py --mib 436
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quark.torch.quantization.calibration.transfer import transfer


def _seconds(run, repeats: int = 3) -> float:
    run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=436, help="tensor size in MiB (bf16)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    host = torch.empty(args.mib * 2**20 // 2, dtype=torch.bfloat16).normal_()
    device = host.cuda()
    gb = host.numel() * host.element_size() / 1e9
    runs = {
        ("h2d", "Tensor.to"): lambda: host.to("cuda"),
        ("h2d", "page-locked staging"): lambda: transfer(host, "cuda"),
        ("d2h", "Tensor.to"): lambda: device.to("cpu"),
        ("d2h", "page-locked staging"): lambda: transfer(device, "cpu"),
        ("d2h", "page-locked, kept pinned"): lambda: transfer(device, "cpu", keep_pinned=True),
    }
    for (direction, method), run in runs.items():
        seconds = _seconds(run)
        print(json.dumps({"direction": direction, "method": method, "mib": args.mib, "ms": round(seconds * 1e3, 2),
                          "gb_per_s": round(gb / seconds, 2), "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
