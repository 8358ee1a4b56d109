"""Bad input: one error line on stderr, exit status 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quark.torch.llm.cli import main
from quark.torch.llm.summary import SUMMARY_FILE

REPO = Path(__file__).resolve().parents[2]


def fails(args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path, *needles: str) -> str:
    out = tmp_path / "out"
    capsys.readouterr()
    code = main([*args, "--output_dir", str(out), "--log_severity_level", "3"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("quark-quantize: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    return lines[0]


def small(model_dir: Path, calib: Path) -> list[str]:
    return ["--model_dir", str(model_dir), "--device", "cpu", "--dataset", str(calib), "--num_calib_data", "2",
            "--seq_len", "32", "--skip_evaluation"]


@pytest.mark.parametrize(("flags", "needles"), [
    (["--quant_scheme", "w_int3"], ["w_int3", "w_fp8_a_fp8", "int4_wo_128", "w_fp4_a_fp4_scale_fp8"]),
    (["--quant_algo", "awq,magic"], ["magic", "gptq", "quarot"]),
    (["--quant_algo", "awq,awq"], ["twice"]),
    (["--dataset", "no_such_corpus"], ["no_such_corpus", "pileval_for_awq_benchmark", "wikitext", "c4"]),
    (["--kv_cache_dtype", "int8"], ["int8", "fp8"]),
    (["--model_export", "tflite"], ["tflite", "hf_format", "onnx", "gguf"]),
    (["--import_file_format", "pth"], ["pth", "hf_format"]),
    (["--device", "tpu"], ["tpu", "cpu"]),
    (["--model_reload"], ["--import_model_dir"]),
    (["--skip_quantization", "--quant_algo", "awq"], ["--quant_algo"]),
    (["--group_size", "0"], ["--group_size"]),
])
def test_flag_errors_before_loading(flags: list[str], needles: list[str], capsys: pytest.CaptureFixture[str],
                                    tmp_path: Path) -> None:
    fails(flags, capsys, tmp_path, *needles)


def test_model_dir_not_a_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["--model_dir", str(empty)], capsys, tmp_path, "no config.json")
    (empty / "config.json").write_text("{not json")
    fails(["--model_dir", str(empty)], capsys, tmp_path, "not valid JSON")
    fails(["--model_dir", str(tmp_path / "missing")], capsys, tmp_path, "not a directory")


def test_output_dir_not_empty_needs_overwrite(tiny_llama_dir: Path, calib_text: Path,
                                              capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = [*small(tiny_llama_dir, calib_text), "--output_dir", str(out), "--log_severity_level", "3"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # --overwrite replaces only a previous output (recognised by its quark_summary.json)
    assert main([*args, "--overwrite"]) == 2
    assert SUMMARY_FILE in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert main(args) == 0
    (out / "stale.txt").write_text("from an earlier run")
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [SUMMARY_FILE]
    assert json.loads((out / SUMMARY_FILE).read_text())["mode"] == "quantize"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_seq_len_longer_than_context(tiny_llama_dir: Path, calib_text: Path, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    fails([*small(tiny_llama_dir, calib_text), "--seq_len", "300"], capsys, tmp_path, "300", "context (256")


def test_corpus_too_small(tiny_llama_dir: Path, calib_text: Path, capsys: pytest.CaptureFixture[str],
                          tmp_path: Path) -> None:
    line = fails([*small(tiny_llama_dir, calib_text), "--num_calib_data", "1000", "--seq_len", "64"], capsys,
                 tmp_path, "too small", "1000")
    assert "window(s) of 64 tokens" in line


def test_hub_dataset_unreachable_suggests_local_path(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(["--model_dir", str(tiny_llama_dir), "--device", "cpu", "--dataset", "pileval", "--skip_evaluation"],
          capsys, tmp_path, "pileval", "local file")


def test_group_size_that_does_not_fit_names_layers(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # stories260K's FFN is 172 wide: group 128 does not divide it
    line = fails(["--device", "cpu", "--quant_scheme", "w_int4_per_group_sym", "--skip_evaluation"], capsys,
                 tmp_path, "down_proj", "172")
    assert "group sizes that fit" in line


def test_mx_block_size_is_fixed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(["--quant_scheme", "w_mxfp8", "--group_size", "64"], capsys, tmp_path, "fixed at 32")


def test_explicit_ppl_dataset_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(["--ppl_dataset", str(tmp_path / "nope.raw")], capsys, tmp_path, "nope.raw")


def test_subprocess_exit_code_and_single_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "quark.torch.llm", "--quant_scheme", "bogus", "--output_dir",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("quark-quantize: error:")
    assert not out.exists()


def test_help_groups_flags_with_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for group in ("model:", "quantization:", "calibration data:", "export:", "reload:", "evaluation:"):
        assert group in text
    assert "(default: 1)" in text  # --batch_size
    assert "w_fp4_a_fp4_scale_fp8" in text
