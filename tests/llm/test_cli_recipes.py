"""Every recipe of ``llm-ptq-example.rst`` run through the command line on a tiny model.

Most recipes call ``quark.torch.llm.cli.main(argv)`` in this process (the same code path as the
console script, a subprocess costs several seconds of imports on 2 cores); the README's first
command, recipe 2 and recipe 11 run as real subprocesses (``python -m quark.torch.llm``). The
recipes' hub dataset (pileval) is replaced by a local JSON-lines file (no network in CI);
evaluation uses a short local text.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from quark.torch.llm.cli import main
from quark.torch.llm.summary import SUMMARY_FILE

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_cli(args: list[str], tmp: Path, *, subprocess_run: bool = False,
            capsys: pytest.CaptureFixture[str] | None = None) -> Result:
    args = [*args, "--log_severity_level", "2"]
    if subprocess_run:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run([sys.executable, "-m", "quark.torch.llm", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        return Result(done.returncode, done.stdout, done.stderr)
    assert capsys is not None
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, calib_text: Path) -> tuple[Path, Path]:
    """(calibration .jsonl, evaluation .txt) made from the stories text."""
    folder = tmp_path_factory.mktemp("corpus")
    stories = calib_text.read_text(encoding="utf-8").split("<|endoftext|>")
    jsonl = folder / "calib.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s.strip()}) + "\n" for s in stories if s.strip()), encoding="utf-8")
    evaluation = folder / "eval.txt"
    evaluation.write_text("\n\n".join(s.strip() for s in stories[:2]), encoding="utf-8")
    return jsonl, evaluation


def common(model_dir: Path, corpus: tuple[Path, Path]) -> list[str]:
    return ["--model_dir", str(model_dir), "--device", "cpu", "--dataset", str(corpus[0]), "--num_calib_data", "2",
            "--seq_len", "64", "--ppl_dataset", str(corpus[1]), "--ppl_seq_len", "64", "--ppl_max_windows", "2"]


# (id, recipe flags, export formats asked)
RECIPES: list[tuple[str, list[str], list[str]]] = [
    ("2-fp8-kv-hf", ["--quant_scheme", "w_fp8_a_fp8", "--kv_cache_dtype", "fp8", "--model_export", "hf_format"],
     ["hf_format"]),
    ("2-fp8-custom-fp8", ["--quant_scheme", "w_fp8_a_fp8", "--kv_cache_dtype", "fp8", "--model_export", "hf_format",
                          "--custom_mode", "fp8"], ["hf_format"]),
    ("3-int4-awq-hf", ["--quant_scheme", "w_int4_per_group_sym", "--quant_algo", "awq", "--model_export",
                       "hf_format"], ["hf_format"]),
    ("4-int8-static-hf", ["--quant_scheme", "w_int8_a_int8_per_tensor_sym", "--model_export", "hf_format"],
     ["hf_format"]),
    ("5-uint4-awq-gguf", ["--quant_scheme", "w_uint4_per_group_asym", "--quant_algo", "awq", "--group_size", "32",
                          "--model_export", "gguf"], ["gguf"]),
    ("int8-hf-and-onnx", ["--quant_scheme", "w_int8_a_int8_per_tensor_sym", "--model_export", "hf_format,onnx"],
     ["hf_format", "onnx"]),
    ("6-mxfp8", ["--quant_scheme", "w_mxfp8", "--group_size", "32"], []),
    ("6-mxfp8-a", ["--quant_scheme", "w_mxfp8_a_mxfp8", "--group_size", "32"], []),
    ("7-bfp16", ["--quant_scheme", "w_bfp16"], []),
    ("7-bfp16-a", ["--quant_scheme", "w_bfp16_a_bfp16"], []),
    ("8-mx6", ["--quant_scheme", "w_mx6"], []),
    ("8-mx6-a", ["--quant_scheme", "w_mx6_a_mx6"], []),
    ("9-fp4-scale-fp8", ["--quant_scheme", "w_fp4_scale_fp8"], []),
    ("9-fp4-a-fp4-scale-fp8", ["--quant_scheme", "w_fp4_a_fp4_scale_fp8"], []),
    ("quarot-fp8-kv-post-rope-hf", ["--quant_scheme", "w_fp8_a_fp8", "--kv_cache_dtype", "fp8", "--kv_cache_post_rope",
                                    "--quant_algo", "quarot", "--model_export", "hf_format"], ["hf_format"]),
    ("fp8-kv-gptq-hf", ["--quant_scheme", "w_fp8_a_fp8", "--kv_cache_dtype", "fp8", "--quant_algo", "gptq",
                        "--model_export", "hf_format"], ["hf_format"]),
    ("int8-quarot-gptq-hf", ["--quant_scheme", "w_int8_a_int8_per_tensor_sym", "--quant_algo", "quarot,gptq",
                             "--model_export", "hf_format"], ["hf_format"]),
]


def check_summary(out: Path, scheme: str) -> dict:
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["mode"] == "quantize"
    assert summary["scheme"] == scheme
    assert summary["quantized_layers"] == 14  # 7 Linears x 2 layers; lm_head excluded
    assert summary["excluded_layers"] == ["lm_head"]
    for stage in ("float", "quantized"):
        assert math.isfinite(summary["evaluation"][stage]["perplexity"])
    return summary


@pytest.mark.parametrize("recipe", RECIPES, ids=[r[0] for r in RECIPES])
def test_recipe(recipe: tuple[str, list[str], list[str]], tiny_llama_dir: Path, corpus: tuple[Path, Path],
                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name, flags, formats = recipe
    out = tmp_path / "out"
    result = run_cli([*common(tiny_llama_dir, corpus), "--output_dir", str(out), *flags], tmp_path,
                     subprocess_run=name == "2-fp8-kv-hf", capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    scheme = flags[flags.index("--quant_scheme") + 1]
    summary = check_summary(out, scheme)
    assert "perplexity quantized" in result.stdout
    if "--kv_cache_dtype" in flags:
        assert summary["kv_cache_dtype"] == "fp8"
    if "--quant_algo" in flags:
        assert summary["algorithms"] == flags[flags.index("--quant_algo") + 1].split(",")
    if "hf_format" in formats:
        config = json.loads((out / "config.json").read_text())
        method = "fp8" if "--custom_mode" in flags else "quark"
        assert config["quantization_config"]["quant_method"] == method
        if method == "quark":
            assert config["quantization_config"]["kv_cache_post_rope"] == ("--kv_cache_post_rope" in flags)
        if "quarot" in flags:
            from safetensors.torch import load_file

            keys = {k for f in out.glob("*.safetensors") for k in load_file(str(f))}
            for key in ("self_attn.qk_rotation", "mlp.down_proj.input_rotation", "self_attn.key_quantizer.scale"):
                assert f"model.layers.0.{key}" in keys
        assert any(out.glob("*.safetensors"))
    if "gguf" in formats:
        assert any((out / "gguf").glob("*.gguf"))
    if "onnx" in formats:
        assert (out / "onnx" / "quark_model.onnx").stat().st_size > 0
    assert (summary["output_bytes"] > 0) == bool(formats)  # bytes of the exported files


def test_recipe1_float_evaluation(tiny_llama_dir: Path, corpus: tuple[Path, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "float"
    result = run_cli([*common(tiny_llama_dir, corpus), "--skip_quantization", "--output_dir", str(out)], tmp_path,
                     capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["mode"] == "float" and summary["quantized_layers"] == 0
    assert math.isfinite(summary["evaluation"]["float"]["perplexity"])
    assert "quantized" not in summary["evaluation"]


def test_recipe10_moe_second_step(tiny_mixtral_dir: Path, corpus: tuple[Path, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "moe"
    result = run_cli([*common(tiny_mixtral_dir, corpus), "--quant_scheme", "w_fp8_a_fp8", "--kv_cache_dtype", "fp8",
                      "--moe_experts_second_step_config", "w_int4_per_channel_sym", "--output_dir", str(out)],
                     tmp_path, capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["unfused_expert_modules"] == 2
    # per layer: q, k, v, o + 4 experts x (gate, up, down); routers are not Linears, lm_head excluded
    assert summary["quantized_layers"] == 2 * (4 + 4 * 3)
    assert summary["moe_second_step"] == "w_int4_per_channel_sym"
    assert math.isfinite(summary["evaluation"]["quantized"]["perplexity"])


def test_recipe11_reload(tiny_llama_dir: Path, corpus: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "exported"
    args = common(tiny_llama_dir, corpus)
    first = run_cli([*args, "--quant_scheme", "w_fp8_a_fp8", "--kv_cache_dtype", "fp8", "--model_export",
                     "hf_format", "--output_dir", str(out)], tmp_path, subprocess_run=True)
    assert first.returncode == 0, first.stderr[-3000:]
    quantized = json.loads((out / SUMMARY_FILE).read_text())["evaluation"]["quantized"]["perplexity"]
    second = run_cli([*args, "--import_model_dir", str(out), "--model_reload", "--import_file_format", "hf_format",
                      "--output_dir", str(tmp_path / "reload")], tmp_path, subprocess_run=True)
    assert second.returncode == 0, second.stderr[-3000:]
    reloaded = json.loads((tmp_path / "reload" / SUMMARY_FILE).read_text())["evaluation"]["reloaded"]
    assert reloaded["perplexity"] == pytest.approx(quantized, rel=1e-3)


def test_embedded_default_first_command(tmp_path: Path) -> None:
    """The README's first command: no model, no data, offline."""
    out = tmp_path / "demo"
    result = run_cli(["--device", "cpu", "--output_dir", str(out)], tmp_path, subprocess_run=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["model"] == "embedded stories260K"
    assert summary["scheme"] == "w_fp8_a_fp8" and summary["kv_cache_dtype"] == "fp8"
    float_nll = summary["evaluation"]["float"]["nll"]
    assert float_nll == pytest.approx(1.266, abs=5e-4)  # ../shared/assets/README.md
    assert summary["evaluation"]["float"]["tokens"] == 1804
    # fp8 W8A8 costs a little on this tiny model, never a lot
    assert float_nll < summary["evaluation"]["quantized"]["nll"] < float_nll + 0.1
