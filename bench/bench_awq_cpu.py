"""Benchmark: AWQ's wall time on CPU against the reference (amd-quark 0.13), run in the same job.

Both sides quantize the same tiny Llama (2 layers, hidden 128, saved once to a temporary folder
with ``save_pretrained``) with ``LLMTemplate.get_config(scheme="uint4_wo_128", algorithm="awq")``
on the same 4 x 32 calibration tokens, each in a fresh interpreter with the same thread count,
alternating ours / reference ``--repeats`` times. The reference is another interpreter (its
package is also imported as ``quark``): ``--reference-python`` or the environment variable
``QUARK_REFERENCE_PYTHON`` (a venv with amd-quark 0.13 and without this package; see the docstring
of ``tests/export/test_reference_crosscheck.py``). Without one, only our times are printed.

Prints one JSON object: the median ``quantize_model`` seconds of each side (import and model
loading excluded), every run's seconds, and ``ours_over_reference`` (below 1: we are faster).

Usage: ``python bench/bench_awq_cpu.py [--reference-python PY] [--repeats 3] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Runs in either interpreter: quantize the saved model and print the seconds quantize_model took.
WORKER = textwrap.dedent("""
    import json, sys, time
    import torch
    import transformers
    from quark.torch import LLMTemplate, ModelQuantizer

    folder, threads = sys.argv[1], int(sys.argv[2])
    if threads > 0:
        torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_kernels=False).eval()
    data = torch.load(folder + "/calib.pt", weights_only=True)
    config = LLMTemplate.get("llama").get_config(scheme="uint4_wo_128", algorithm="awq", exclude_layers=["lm_head"])
    start = time.perf_counter()
    ModelQuantizer(config).quantize_model(model, [d for d in data])
    print(json.dumps({"seconds": time.perf_counter() - start, "quark": __import__("quark").__file__}))
""")


def _save_model(folder: Path) -> None:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    gen = torch.Generator().manual_seed(1)
    torch.save(torch.randint(0, 128, (4, 1, 32), generator=gen), folder / "calib.pt")


def _run(python: str, folder: Path, threads: int, ours: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if ours:
        env["PYTHONPATH"] = str(REPO)
    with tempfile.TemporaryDirectory() as cwd:  # keep this checkout off the reference's sys.path
        script = Path(cwd) / "awq_worker.py"
        script.write_text(WORKER)
        proc = subprocess.run([python, str(script), str(folder), str(threads)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{'ours' if ours else 'reference'} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    inside_repo = Path(result["quark"]).resolve().is_relative_to(REPO)
    if inside_repo != ours:
        raise RuntimeError(f"the {'ours' if ours else 'reference'} run imported quark from {result['quark']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", default=os.environ.get("QUARK_REFERENCE_PYTHON"),
                        help="interpreter with amd-quark 0.13 (default: $QUARK_REFERENCE_PYTHON)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in both workers (0: torch's default)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats={args.repeats} must be at least 1")
    ours: list[float] = []
    reference: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny_llama"
        _save_model(folder)
        for _ in range(args.repeats):
            ours.append(_run(sys.executable, folder, args.threads, ours=True)["seconds"])
            if args.reference_python:
                reference.append(_run(args.reference_python, folder, args.threads, ours=False)["seconds"])
    report = {
        "model": "tiny Llama, 2 layers, hidden 128", "scheme": "uint4_wo_128 + awq", "calibration": "4 x 32 tokens",
        "threads": args.threads or torch.get_num_threads(), "ours_s": statistics.median(ours), "ours_runs_s": ours,
    }
    if reference:
        report.update(reference_s=statistics.median(reference), reference_runs_s=reference,
                      ours_over_reference=statistics.median(ours) / statistics.median(reference))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
