"""``--quant_scheme w_fp4_scale_fp8 --quant_algo gptq|awq`` runs end to end.

Formerly the config was accepted and the run ended in an AttributeError traceback inside the
algorithm ('list' object has no attribute 'dtype'); GPTQ and AWQ now quantize two-stage weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from quark.torch.llm.cli import main


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_two_stage_weight_with_gptq_or_awq_runs(algorithm: str, tiny_llama_dir: Path, calib_text: Path,
                                                capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["--model_dir", str(tiny_llama_dir), "--device", "cpu", "--dataset", str(calib_text),
                 "--num_calib_data", "2", "--seq_len", "32", "--skip_evaluation",
                 "--quant_scheme", "w_fp4_scale_fp8", "--quant_algo", algorithm,
                 "--output_dir", str(out), "--log_severity_level", "3"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    assert (out / "quark_summary.json").is_file()
