"""MoE experts: unfusing keeps outputs; the second step is Q2(Q1(W)) on every expert weight."""

from __future__ import annotations

import torch
import transformers
from torch import nn

from quark.torch import ModelQuantizer
from quark.torch.llm import moe, schemes
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
from quark.torch.quantization.tensor_quantize import fake_quantize_with_spec


def tiny_mixtral() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        num_local_experts=4, num_experts_per_tok=2)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_unfuse_keeps_outputs_and_weights() -> None:
    model = tiny_mixtral()
    fused = model.model.layers[0].mlp.experts
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
    assert moe.unfuse_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, moe.UnfusedExperts) and len(experts) == 4
    assert torch.equal(experts[2].gate_proj.weight, gate_up[2, :96])
    assert torch.equal(experts[2].up_proj.weight, gate_up[2, 96:])
    assert torch.equal(experts[2].down_proj.weight, down[2])
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert moe.unfuse_experts(model) == []  # nothing left to unfuse


def test_second_step_is_progressive() -> None:
    model = tiny_mixtral()
    moe.unfuse_experts(model)
    original = model.model.layers[1].mlp.experts[3].down_proj.weight.detach().clone()
    request = schemes.SchemeRequest("w_fp8_a_fp8", moe_second_step="w_int4_per_channel_sym")
    config = schemes.build_config(schemes.template_for("mixtral"), request)
    touched = moe.prequantize_experts(model, config, schemes.EXPERT_LAYER_PATTERNS)
    assert len(touched) == 2 * 4 * 3
    ModelQuantizer(config).quantize_model(model, [torch.randint(0, 128, (1, 16))])
    layer = model.model.layers[1].mlp.experts[3].down_proj
    assert isinstance(layer, QuantLinear)
    # independent reference: fp8 per-tensor, then int4 symmetric per output channel
    step1 = fake_quantize_with_spec(original, config.global_quant_config.weight)
    step2 = fake_quantize_with_spec(step1, schemes.int4_per_channel_spec())
    torch.testing.assert_close(layer.quantized_weight(), step2, rtol=0, atol=1e-6)
    assert step2.unique().numel() > 1 and not torch.equal(step2, original)
    attention = model.model.layers[1].self_attn.q_proj
    assert attention.weight_quantizer.spec.dtype.name == "fp8_e4m3"


def test_only_stacks_of_matrices_count_as_experts(caplog) -> None:
    """A 3-D parameter that is a single [1, n, H] probe or token, or a convolution's kernel, is not a fused experts
    module (no warning that experts stay in float); a stack of matrices in an unknown layout is."""
    from quark.torch.quantization.moe_experts import fused_expert_modules

    class Probe(nn.Module):  # SigLIP's pooling head: a [1, 1, H] query
        def __init__(self) -> None:
            super().__init__()
            self.probe = nn.Parameter(torch.zeros(1, 1, 8))

    class OddExperts(nn.Module):  # 4 experts' weights in a layout quark does not know
        def __init__(self) -> None:
            super().__init__()
            self.weights = nn.Parameter(torch.zeros(4, 8, 8))

    model = nn.Sequential(Probe(), nn.Conv1d(4, 4, 3), OddExperts())
    assert fused_expert_modules(model) == ([], ["2"])
    with caplog.at_level("WARNING"):
        assert moe.unfuse_experts(model) == []
    assert caplog.text.count("layout quark does not unfuse") == 1 and "2 holds" in caplog.text
