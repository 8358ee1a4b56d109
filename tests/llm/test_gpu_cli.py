"""The command line on a CUDA machine: one device, and accelerate's device_map (--multi_gpu)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from quark.torch.llm.cli import main
from quark.torch.llm.summary import SUMMARY_FILE

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("placement", [["--device", "cuda"], ["--multi_gpu"], ["--device", "cuda", "--offload", "disk"],
                                       ["--device", "cuda", "--offload", "cpu"]])
def test_embedded_model_on_cuda(tmp_path: Path, placement: list[str]) -> None:
    out = tmp_path / "out"
    code = main([*placement, "--output_dir", str(out), "--model_export", "hf_format"])
    assert code == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    text = json.dumps(summary)
    values = [v for k, v in _flatten(summary) if "perplexity" in k and isinstance(v, (int, float))]
    assert values and all(math.isfinite(v) for v in values), text
    assert (out / "model.safetensors").is_file()


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}")
    else:
        yield prefix, obj
