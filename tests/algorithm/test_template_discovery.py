"""A template without algorithm data still runs AWQ/GPTQ: scaling groups come from the model graph."""

from __future__ import annotations

import pytest
import torch

from quark.torch import LLMTemplate, ModelQuantizer
from quark.torch.quantization.config.template import isolated_registry
from tests.helpers.tiny_models import tiny_model, token_batches


@pytest.mark.parametrize("algorithm", ["awq", "gptq"])
def test_algorithm_on_template_without_data(algorithm):
    with isolated_registry():
        LLMTemplate.register_template(LLMTemplate(model_type="bare_llama", model_decoder_layers="model.layers"))
        config = LLMTemplate.get("bare_llama").get_config(scheme="int4_wo_32", algorithm=algorithm)
    model = tiny_model("llama")
    batches = token_batches(4, seq=32)
    with torch.no_grad():
        ref = torch.cat([model(b).logits for b in batches])
    ModelQuantizer(config).quantize_model(model, batches)
    with torch.no_grad():
        out = torch.cat([model(b).logits for b in batches])
    assert torch.isfinite(out).all() and ((out - ref).norm() / ref.norm()) < 0.5
