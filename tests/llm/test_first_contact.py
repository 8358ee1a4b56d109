"""A newcomer's first runs: every check before any expensive work, and outputs that say what they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from quark.torch import ModelQuantizer
from quark.torch.llm import export_step, perplexity
from quark.torch.llm.cli import main
from quark.torch.llm.summary import SUMMARY_FILE


def small(model_dir: Path, calib: Path) -> list[str]:
    return ["--model_dir", str(model_dir), "--device", "cpu", "--dataset", str(calib), "--num_calib_data", "1",
            "--seq_len", "32", "--log_severity_level", "2"]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_quantization(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any calibration/quantization in the test fails it: the checks must come first."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("quantization ran before the export checks")

    monkeypatch.setattr(ModelQuantizer, "quantize_model", refuse)


@pytest.mark.parametrize(("flags", "needle"), [
    (["--quant_scheme", "w_int8_a_int8_per_tensor_sym", "--model_export", "onnx", "gguf"], "no GGML block type"),
    (["--quant_scheme", "w_mxfp8", "--model_export", "onnx"], "--model_export onnx cannot represent"),
    (["--quant_scheme", "w_uint4_per_group_asym", "--model_export", "hf_format", "--custom_mode", "compressed-tensors"],
     "--custom_mode compressed-tensors"),
    (["--quant_scheme", "w_int8_a_int8_per_tensor_sym", "--model_export", "hf_format", "--custom_mode", "fp8"],
     "--custom_mode fp8"),
    (["--quant_scheme", "w_fp8_a_fp8", "--model_export", "hf_format", "--custom_mode", "awq"], "--custom_mode awq"),
])
def test_every_export_checked_before_quantizing(flags: list[str], needle: str, tiny_llama_dir: Path,
                                                calib_text: Path, tmp_path: Path, no_quantization: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    code, _, err = run([*small(tiny_llama_dir, calib_text), "--skip_evaluation", *flags, "--output_dir", str(out)],
                       capsys)
    assert code == 2, err
    assert needle in err and "before any work" in err
    assert not out.exists()


def test_awq_layout_refuses_mixed_group_sizes_of_fallback(tmp_path: Path, no_quantization: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # stories260K: down_proj (172 wide) falls back to per-channel, which the one-group AWQ layout cannot hold
    code, _, err = run(["--quant_scheme", "w_int4_per_group_sym", "--group_size", "32", "--unfit_layers", "fallback",
                        "--skip_evaluation", "--model_export", "hf_format", "--custom_mode", "awq", "--output_dir",
                        str(tmp_path / "o"), "--log_severity_level", "3"], capsys)
    assert code == 2 and "one group size (32)" in err


def test_missing_export_package_found_before_loading(monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path,
                                                     calib_text: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(export_step, "_installed", lambda module: module != "gguf")
    monkeypatch.setattr("quark.torch.llm.pipeline.load_config", lambda *a: pytest.fail("loaded before checking"))
    code, _, err = run([*small(tiny_llama_dir, calib_text), "--quant_scheme", "w_uint4_per_group_asym",
                        "--group_size", "32", "--model_export", "gguf", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "pip install gguf" in err


def test_gguf_family_checked_before_loading_the_model(tiny_mixtral_dir: Path, calib_text: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("quark.torch.llm.pipeline.load_model", lambda *a, **k: pytest.fail("model loaded"))
    code, _, err = run([*small(tiny_mixtral_dir, calib_text), "--quant_scheme", "w_uint4_per_group_asym",
                        "--group_size", "32", "--model_export", "gguf", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "'mixtral'" in err and "llama" in err


def test_hub_id_as_model_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["--model_dir", "HuggingFaceTB/SmolLM2-135M"], capsys)
    assert code == 2
    assert "no hub access" in err and "huggingface-cli download HuggingFaceTB/SmolLM2-135M" in err


def test_skipped_evaluation_is_said_and_names_ppl_dataset(monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path,
                                                          calib_text: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    def offline(source: str) -> str:
        raise ValueError(f"dataset {source!r} could not be loaded from the Hugging Face hub; pass a local file "
                         "instead (e.g. --dataset ./corpus.jsonl)")

    monkeypatch.setattr(perplexity, "evaluation_text", offline)
    out = tmp_path / "o"
    with caplog.at_level("WARNING", logger="quark"):
        code, _, err = run([*small(tiny_llama_dir, calib_text), "--quant_scheme", "w_fp8_a_fp8", "--output_dir",
                            str(out)], capsys)
    assert code == 0, err
    note = json.loads((out / SUMMARY_FILE).read_text())["evaluation_note"]
    assert "--ppl_dataset" in note and "--dataset" not in note.replace("--ppl_dataset", "")
    assert any("evaluation skipped" in r.getMessage() and "--ppl_dataset" in r.getMessage() for r in caplog.records)


def test_export_keeps_use_cache_and_summary_records_the_run(tiny_llama_dir: Path, calib_text: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert json.loads((tiny_llama_dir / "config.json").read_text())["use_cache"] is True
    out = tmp_path / "o"
    argv = [*small(tiny_llama_dir, calib_text), "--skip_evaluation", "--quant_scheme", "w_fp8_a_fp8", "--seed", "7",
            "--model_export", "hf_format", "--output_dir", str(out)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["seed"] == 7
    assert summary["command_line"] == ["quark-quantize", *argv]
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["versions"]["transformers"] == transformers.__version__
    assert summary["versions"]["quark-torch"]


def _dequantized_reference(source: Path, export: Path) -> torch.nn.Module:
    """The source float model with the exported fp8 weights times their scales (what the layout means)."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tensors = load_file(str(export / "model.safetensors"))
    state = ref.state_dict()
    for key, value in tensors.items():
        if key.endswith(".weight_scale_inv"):
            weight = key.removesuffix("_scale_inv")
            state[weight] = tensors[weight].float() * value.float()
    ref.load_state_dict(state)
    return ref


def test_fp8_export_for_transformers_loads_there(tiny_llama_dir: Path, calib_text: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    code, stdout, err = run([*small(tiny_llama_dir, calib_text), "--skip_evaluation", "--quant_scheme", "w_fp8_a_fp8",
                             "--model_export", "hf_format", "--custom_mode", "fp8", "--fp8_scale_names",
                             "transformers", "--output_dir", str(out)], capsys)
    assert code == 0, err
    assert "load it with transformers" in stdout
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 2]])
    reference = _dequantized_reference(tiny_llama_dir, out)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, reference(ids).logits, atol=1e-5)


def test_fp8_default_names_say_which_consumer(tiny_llama_dir: Path, calib_text: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    with caplog.at_level("WARNING", logger="quark"):
        code, _, err = run([*small(tiny_llama_dir, calib_text), "--skip_evaluation", "--quant_scheme", "w_fp8_a_fp8",
                            "--model_export", "hf_format", "--custom_mode", "fp8", "--output_dir", str(out)], capsys)
    assert code == 0, err
    notes = json.loads((out / SUMMARY_FILE).read_text())["notes"]
    assert any("vLLM" in n and "--fp8_scale_names transformers" in n for n in notes)
    assert any("transformers ignores these names" in r.getMessage() for r in caplog.records)


def test_fp8_scale_names_needs_fp8_layout(tiny_llama_dir: Path, calib_text: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([*small(tiny_llama_dir, calib_text), "--model_export", "hf_format", "--fp8_scale_names",
                        "transformers", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "--custom_mode fp8 only" in err
