"""``--quant_scheme w_fp4_scale_fp8 --quant_algo gptq|awq``: one error line when the config is built.

Formerly the config was accepted and the run ended in an AttributeError traceback inside the
algorithm ('list' object has no attribute 'dtype'); now ``Config`` refuses the two-stage weight
spec for algorithms that cannot quantize it, before any model work.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from quark.torch.llm.cli import main


@pytest.mark.parametrize(("algorithm", "config_name"), [("gptq", "GPTQConfig"), ("awq", "AWQConfig")])
def test_two_stage_weight_with_gptq_or_awq_is_one_error_line(algorithm: str, config_name: str,
                                                             tiny_llama_dir: Path, calib_text: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["--model_dir", str(tiny_llama_dir), "--device", "cpu", "--dataset", str(calib_text),
                 "--num_calib_data", "2", "--seq_len", "32", "--skip_evaluation",
                 "--quant_scheme", "w_fp4_scale_fp8", "--quant_algo", algorithm,
                 "--output_dir", str(out), "--log_severity_level", "3"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "AttributeError" not in err
    lines = [line for line in err.splitlines() if line.startswith("quark-quantize: error:")]
    assert len(lines) == 1, err
    assert "weight is a two-stage spec (fp4 with fp8_e4m3 scales)" in lines[0]
    assert f"which {config_name} cannot quantize" in lines[0]
    assert not out.exists()
