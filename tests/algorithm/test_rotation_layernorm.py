"""Rotation / QuaRot on LayerNorm models (OPT): mean-free stream, plain LayerNorms, valid OPT checkpoints.

Reference: the unrotated model's logits. Tolerance: weights are rotated in float64 and stored in
float32, so logits (|x| ~ 3) agree to ~1e-5 (measured ≤ 7e-6); we allow 1e-4 absolute.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny_models import make_batches, make_config

from quark.torch.algorithm.api import apply_pre_quant_optimization
from quark.torch.quantization.config.config import Config, QuantizationConfig, QuaRotConfig, RotationConfig

ATOL = 1e-4
X = make_batches(2, seq=16, seed=3)


def opt_model(seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """Tiny OPT with every weight, bias and LayerNorm affine random (so folding is exercised)."""
    torch.manual_seed(seed)
    cfg = make_config("opt")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(torch.rand_like(p) + 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3)
            else:
                p.copy_(torch.randn_like(p) * 0.08)
        emb = model.get_input_embeddings().weight
        emb[:, :4] *= 8.0  # outlier channels
        emb += 0.5  # and a mean far from 0
    return model


def rotate(model, cfg):
    rotated = copy.deepcopy(model)
    apply_pre_quant_optimization(rotated, [cfg], Config(global_quant_config=QuantizationConfig()), X, "cpu")
    return rotated


def assert_same_logits(a, b):
    with torch.no_grad():
        for x in X:
            assert torch.allclose(a(x).logits, b(x).logits, atol=ATOL)


def layer_norms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}, {"enable_bias": False}],
                         ids=["tied", "untied", "no-linear-bias"])
@pytest.mark.parametrize("cfg", [RotationConfig(), RotationConfig(random=True), QuaRotConfig()],
                         ids=["rotation", "rotation-random", "quarot"])
def test_opt_rotation_preserves_logits_and_keeps_layernorms(overrides, cfg):
    model = opt_model(**overrides)
    rotated = rotate(model, cfg)
    assert_same_logits(rotated, model)
    assert rotated.lm_head.weight is not rotated.model.decoder.embed_tokens.weight
    assert rotated.config.tie_word_embeddings is False
    final = rotated.model.decoder.final_layer_norm
    norms = layer_norms(rotated)
    assert len(norms) == 5 and all(type(m) is torch.nn.LayerNorm for m in norms.values())
    for name, norm in norms.items():
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)), name
        if norm is not final and overrides.get("enable_bias", True):
            assert torch.equal(norm.bias, torch.zeros_like(norm.bias)), name
    # The head has no bias, so the final norm keeps its bias, moved to the rotated basis.
    assert not torch.equal(final.bias, torch.zeros_like(final.bias))
    # The residual stream is mean-free after rotation (it is not before).
    with torch.no_grad():
        before = model(X[0], output_hidden_states=True).hidden_states
        after = rotated(X[0], output_hidden_states=True).hidden_states
    assert all(float(h.mean(-1).abs().max()) < 1e-4 for h in after[:-1])  # the last is the final norm output
    assert float(before[0].mean(-1).abs().max()) > 0.1


@pytest.mark.parametrize("cfg", [RotationConfig(random=True), QuaRotConfig(had=False, random2=True)],
                         ids=["rotation", "quarot-r1-r2"])
def test_opt_rotated_model_is_an_opt_checkpoint(tmp_path, cfg):
    model = opt_model()
    rotated = rotate(model, cfg)
    rotated.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        for x in X:
            assert torch.equal(reloaded(x).logits, rotated(x).logits)
    assert_same_logits(reloaded, model)


def test_hidden_size_without_hadamard_uses_random_rotation():
    # hidden 52 (4 heads of 13): no Hadamard matrix of order 52 is built here.
    model = opt_model(hidden_size=52, word_embed_proj_dim=52)
    assert_same_logits(rotate(model, RotationConfig(random=True)), model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"RotationConfig.random=False: no Hadamard matrix of size 52"):
        rotate(model, RotationConfig())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(("overrides", "match"), [
    ({"do_layer_norm_before": False}, "post-norm blocks, such as OPT with do_layer_norm_before=False"),
    ({"word_embed_proj_dim": 32}, "project_out when word_embed_proj_dim != hidden_size"),
])
@pytest.mark.parametrize("cfg", [RotationConfig(random=True), QuaRotConfig()], ids=["rotation", "quarot"])
def test_unsupported_opt_structures_are_refused_before_any_change(overrides, match, cfg):
    model = opt_model(**overrides)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        apply_pre_quant_optimization(model, [cfg], Config(global_quant_config=QuantizationConfig()), X, "cpu")
    assert torch.equal(model.model.decoder.layers[0].fc1.weight, before["model.decoder.layers.0.fc1.weight"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight  # still tied
