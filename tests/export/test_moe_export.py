"""MoE checkpoints (per-expert Linears) reload into transformers 5's fused-experts models."""

from __future__ import annotations

import pytest
import torch
import transformers

from quark.torch import ModelExporter, ModelImporter, ModelQuantizer
from quark.torch.export.config.config import ExporterConfig, JsonExporterConfig
from quark.torch.llm import schemes
from quark.torch.quantization.moe_experts import UnfusedExperts, unfuse_experts
from tests.export.helpers import quantize_and_export

GQA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, max_position_embeddings=128,
           num_key_value_heads=2, intermediate_size=128, num_experts_per_tok=2)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**GQA, num_local_experts=4),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**GQA, moe_intermediate_size=64,
                                                     shared_expert_intermediate_size=128, num_experts=4),
}


def _fresh(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()


@pytest.mark.parametrize("scheme", ["w_fp8_a_fp8", "w_uint4_per_group_asym"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_moe_export_reloads_with_equal_logits(family, scheme, tmp_path):
    batches = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = _fresh(family)
    assert unfuse_experts(model)
    config = schemes.build_config(schemes.template_for(family), schemes.SchemeRequest(
        scheme, group_size=32 if "group" in scheme else None, kv_cache_dtype="fp8" if "fp8" in scheme else None))
    out = tmp_path / "out"
    ref = quantize_and_export(model, config, batches, out)

    imported = ModelImporter(str(out)).import_model_info(_fresh(family))  # fused experts: unfused on import
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))  # through quark's _map_to_quark
    for reloaded in (imported, loaded):
        assert any(isinstance(m, UnfusedExperts) for m in reloaded.modules())
        with torch.no_grad():
            torch.testing.assert_close(reloaded(batches[0]).logits, ref, rtol=0, atol=1e-5)


def test_custom_modes_warn_for_per_expert_moe(tmp_path, caplog):
    batches = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))]
    model = _fresh("mixtral")
    unfuse_experts(model)
    config = schemes.build_config(schemes.template_for("mixtral"), schemes.SchemeRequest("w_fp8_a_fp8"))
    quantizer = ModelQuantizer(config)
    quantizer.quantize_model(model, batches)
    quantizer.freeze(model)
    with caplog.at_level("WARNING", logger="quark.torch.export.api"):
        ModelExporter(ExporterConfig(json_export_config=JsonExporterConfig()), str(tmp_path / "o")
                      ).export_safetensors_model(model, config, custom_mode="compressed-tensors")
    assert "per-expert MoE" in caplog.text
