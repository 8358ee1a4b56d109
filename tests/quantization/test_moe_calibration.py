"""Static calibration of MoE experts the router never picks (``calibrate_all_experts``)."""

from __future__ import annotations

import pytest
import torch
import transformers

from quark.torch import ModelQuantizer
from quark.torch.llm import schemes
from quark.torch.quantization.moe_experts import all_experts_see_every_token, unfuse_experts

CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, max_position_embeddings=128,
              num_key_value_heads=2, intermediate_size=128, num_experts_per_tok=1, num_local_experts=16)
FEW_TOKENS = [torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(0))]


def _mixtral() -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(**CONFIG)).eval()
    unfuse_experts(model)
    return model


def _fp8_config():
    return schemes.build_config(schemes.template_for("mixtral"), schemes.SchemeRequest("w_fp8_a_fp8"))


def test_routing_every_token_leaves_outputs_unchanged():
    model = _mixtral()
    batch = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(batch).logits
        with all_experts_see_every_token(model) as blocks:
            assert blocks == 2
            out = model(batch).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_unpicked_expert_fails_with_a_hint_then_calibrates_with_the_option():
    model = _mixtral()
    with pytest.raises(RuntimeError, match="calibrate_all_experts"):
        ModelQuantizer(_fp8_config()).quantize_model(model, FEW_TOKENS)
    assert not any("Quant" in type(m).__name__ for m in model.modules())  # the failed run was undone
    ModelQuantizer(_fp8_config(), calibrate_all_experts=True).quantize_model(model, FEW_TOKENS)
    expert = model.model.layers[0].mlp.experts[15]
    assert expert.gate_proj.input_quantizer.scale.item() > 0 and expert.down_proj.input_quantizer.scale.item() > 0
    assert not any(getattr(m, "route_all_tokens", False) for m in model.modules())  # reset after calibration
    with torch.no_grad():
        assert torch.isfinite(model(FEW_TOKENS[0]).logits).all()
