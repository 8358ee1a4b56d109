"""Every family × the scaling algorithms × export: AWQ and SmoothQuant from the family's template run,
and the AWQ model exported in the quark layout reloads in transformers with identical logits.

Families whose template names a remote-code architecture (chatglm, qwen, grok-1) and mllama (its
own test) are left out: their templates do not match the closest transformers architecture.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from quark.torch import ModelExporter, ModelQuantizer
from quark.torch.export.config.config import ExporterConfig, JsonExporterConfig
from quark.torch.llm import schemes
from quark.torch.quantization.moe_experts import unfuse_experts
from tests.llm.test_families import FAMILIES

SKIP = {"mllama", "chatglm", "qwen", "grok-1"}
BATCHES = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    unfuse_experts(model)
    return model


def _quantize(family: str, scheme: str, algorithm: str, group: int | None) -> tuple[torch.nn.Module, object]:
    model = _model(family)
    config = schemes.build_config(schemes.template_for(family),
                                  schemes.SchemeRequest(scheme, group_size=group, algorithms=[algorithm]))
    ModelQuantizer(config).quantize_model(model, BATCHES)
    return model, config


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in SKIP])
def test_scaling_algorithms_and_transformers_reload(family, tmp_path):
    smoothed, _ = _quantize(family, "w_int8_a_int8_per_tensor_sym", "smoothquant", None)
    with torch.no_grad():
        assert torch.isfinite(smoothed(BATCHES[0]).logits).all()
    model, config = _quantize(family, "w_uint4_per_group_asym", "awq", 32)
    ModelQuantizer(config).freeze(model)
    with torch.no_grad():
        ref = model(BATCHES[0]).logits
    assert torch.isfinite(ref).all()
    out = tmp_path / "out"
    ModelExporter(ExporterConfig(json_export_config=JsonExporterConfig()), str(out)).export_safetensors_model(
        model, config)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        torch.testing.assert_close(loaded(BATCHES[0]).logits, ref, rtol=0, atol=1e-5)
