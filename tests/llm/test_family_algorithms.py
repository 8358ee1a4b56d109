"""Every family × the scaling algorithms × export: AWQ and SmoothQuant from the family's template run,
and the AWQ model exported in the quark layout reloads in transformers with identical logits.

Families whose template names a remote-code architecture (chatglm, qwen, grok-1) and mllama (its
own test) are left out: their templates do not match the closest transformers architecture.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from quark.torch import ModelQuantizer
from quark.torch.llm import schemes
from quark.torch.quantization.config.config import Config
from quark.torch.quantization.moe_experts import unfuse_experts
from tests.export.helpers import quantize_and_export
from tests.llm.test_families import FAMILIES

SKIP = {"mllama", "chatglm", "qwen", "grok-1"}
BATCHES = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    unfuse_experts(model)
    return model


def _config(family: str, scheme: str, algorithm: str, group: int | None) -> Config:
    return schemes.build_config(schemes.template_for(family),
                                schemes.SchemeRequest(scheme, group_size=group, algorithms=[algorithm]))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in SKIP])
def test_scaling_algorithms_and_transformers_reload(family, tmp_path):
    smoothed = _model(family)
    ModelQuantizer(_config(family, "w_int8_a_int8_per_tensor_sym", "smoothquant", None)).quantize_model(
        smoothed, BATCHES)
    with torch.no_grad():
        assert torch.isfinite(smoothed(BATCHES[0]).logits).all()
    out = tmp_path / "out"
    ref = quantize_and_export(_model(family), _config(family, "w_uint4_per_group_asym", "awq", 32), BATCHES, out)
    assert torch.isfinite(ref).all()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        torch.testing.assert_close(loaded(BATCHES[0]).logits, ref, rtol=0, atol=1e-5)
