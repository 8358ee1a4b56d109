"""QuaRot checkpoints with online Hadamards load through transformers with their rotations."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from quark.torch import LLMTemplate
from quark.torch.quantization.config.config import QuaRotConfig
from tests.export.helpers import quantize_and_export
from tests.helpers.tiny_models import tiny_model, token_batches


def test_quarot_r4_checkpoint_loads_in_transformers_with_equal_logits(tmp_path):
    model = tiny_model("llama")
    config = LLMTemplate.get("llama").get_config(scheme="fp8")
    config.pre_quant_opt_config = [QuaRotConfig(kv_cache_quant=False)]
    batches = token_batches(2)
    out = tmp_path / "out"
    ref = quantize_and_export(model, config, batches, out)
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    rotations = [n for n, _ in loaded.named_buffers() if n.endswith("input_rotation")]
    assert rotations == [f"model.layers.{i}.mlp.down_proj.input_rotation" for i in range(2)]
    with torch.no_grad():
        torch.testing.assert_close(loaded(batches[0]).logits, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_cli_quarot_checkpoint_loads_in_transformers(family, tmp_path):
    """The command line puts QuaRot in algo_config; OPT's MLP writer (fc2) sits outside any `mlp` module."""
    from quark.torch.llm import schemes

    model = tiny_model(family)
    batches = token_batches(2)
    config = schemes.build_config(schemes.template_for(family), schemes.SchemeRequest(
        "w_int8_a_int8_per_tensor_sym", algorithms=["quarot"]))
    out = tmp_path / "out"
    ref = quantize_and_export(model, config, batches, out)
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert len([n for n, _ in loaded.named_buffers() if n.endswith("input_rotation")]) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(batches[0]).logits, ref, rtol=0, atol=1e-5)
