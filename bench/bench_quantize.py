"""Benchmark: cost of ModelQuantizer per scheme, as ratios against baselines in the same process.

For each scheme it reports (one JSON object per line):
- ``quantize_over_forward``: wall time of ``quantize_model`` (insertion + calibration) divided by
  the time of plain float forwards over the same calibration batches;
- ``frozen_weight_bytes_ratio``: bytes of the frozen linear weights (storage + scales + zero
  points) over their float32 bytes;
- ``frozen_over_fake_forward``: forward time of the frozen (dequantize-on-the-fly) model over the
  fake-quantized model;
- ``peak_rss_delta_mb``: growth of the process's peak RSS during quantization (CPU) or the CUDA
  peak allocation over the float model's (GPU).

Usage: ``python bench/bench_quantize.py [--model DIR] [--device cpu|cuda] [--schemes fp8,int8,...]``.
Without ``--model`` it uses the embedded stories260K model shipped in the package (groups that
do not divide its 172-wide FFN are run with ``*down_proj`` excluded, and say so).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import time
from pathlib import Path

import torch

from quark.torch import LLMTemplate, ModelQuantizer
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "quark" / "torch" / "llm" / "assets" / "stories260K"
SCHEMES = ["fp8", "int8", "int4_wo_32", "uint4_wo_64", "mxfp4", "mxfp6_e3m2", "mx6", "bfp16"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_forward(model: torch.nn.Module, batches: list[torch.Tensor], repeats: int = 3) -> float:
    with torch.no_grad():
        for b in batches[:1]:
            model(b)
        if batches[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            for b in batches:
                model(b)
        if batches[0].is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    stored = floats = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            floats += module.in_features * module.out_features * 4
            stored += module.weight.numel() * module.weight.element_size()
            wq = module.weight_quantizer
            for t in (wq.scale, wq.zero_point) if wq is not None else ():
                if t is not None:
                    stored += t.numel() * t.element_size()
    return stored, floats


def run(model_dir: Path, device: str, schemes: list[str], n_batches: int, seq_len: int) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_kernels=False).to(device).eval()
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (1, seq_len), generator=gen).to(device) for _ in range(n_batches)]
    float_time = _time_forward(base, batches, repeats=1)
    template = LLMTemplate.get(LLMTemplate.get_model_type(base))
    for scheme in schemes:
        model = copy.deepcopy(base)
        config = template.get_config(scheme=scheme)
        note = ""
        try:
            ModelQuantizer(config).quantize_model(copy.deepcopy(model), batches[:1])
        except ValueError:
            config = template.get_config(scheme=scheme, exclude_layers=["lm_head", "*down_proj"])
            note = "down_proj excluded (group does not divide its input width)"
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.max_memory_allocated()
        rss_before = _peak_rss_mb()
        start = time.perf_counter()
        ModelQuantizer(config).quantize_model(model, batches)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if device == "cuda" else (
            _peak_rss_mb() - rss_before)
        fake_time = _time_forward(model, batches)
        ModelQuantizer.freeze(model)
        frozen_time = _time_forward(model, batches)
        stored, floats = _weight_bytes(model)
        row = {
            "bench": "quantize", "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
            or platform.machine(), "torch": torch.__version__, "model": model_dir.name, "scheme": scheme,
            "calib_batches": n_batches, "seq_len": seq_len, "quantize_seconds": round(seconds, 4),
            "quantize_over_forward": round(seconds / float_time, 2),
            "frozen_weight_bytes_ratio": round(stored / floats, 4),
            "frozen_over_fake_forward": round(frozen_time / fake_time, 2),
            "peak_rss_delta_mb" if device != "cuda" else "cuda_peak_delta_mb": round(peak, 1),
        }
        if note:
            row["note"] = note
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    args = parser.parse_args()
    run(args.model, args.device, args.schemes.split(","), args.batches, args.seq_len)


if __name__ == "__main__":
    main()
