"""Rotation / QuaRot preserve float outputs; Hadamard constructions; clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import make_batches, make_model

from quark.torch import ModelQuantizer
from quark.torch.algorithm.api import apply_pre_quant_optimization
from quark.torch.algorithm.rotation.hadamard import hadamard_matrix, orthogonal_rotation
from quark.torch.quantization.config.config import Config, QuantizationConfig, QuaRotConfig, RotationConfig
from quark.torch.quantization.config.custom_config import INT8_PER_CHANNEL_SPEC

# Stated tolerance: rotations are applied in float64 and stored in float32, so logits (|x| ~ 3)
# agree to ~1e-5; we allow 1e-4 absolute.
ATOL = 1e-4
X = make_batches(2, seq=16, seed=3)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 64, 576, 1536])
def test_hadamard_sizes(n):
    h = hadamard_matrix(n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=h.dtype))


def test_hadamard_unavailable_and_random_fallback():
    with pytest.raises(ValueError, match="no Hadamard matrix of size 52"):
        hadamard_matrix(52)
    q = orthogonal_rotation(52, random=True)
    assert torch.allclose(q @ q.t(), torch.eye(52, dtype=q.dtype), atol=1e-12)
    r = orthogonal_rotation(64, random=True)
    assert torch.allclose(r @ r.t(), torch.eye(64, dtype=r.dtype), atol=1e-12)
    assert not torch.allclose(r, orthogonal_rotation(64))


def _check_preserved(model, cfg):
    rotated = copy.deepcopy(model)
    apply_pre_quant_optimization(rotated, [cfg], Config(global_quant_config=QuantizationConfig()), X, "cpu")
    with torch.no_grad():
        for b in X:
            assert torch.allclose(rotated(b).logits, model(b).logits, atol=ATOL)
    assert not torch.allclose(rotated.get_input_embeddings().weight, model.get_input_embeddings().weight)
    return rotated


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3"])
def test_rotation_preserves_float_outputs(family):
    _check_preserved(make_model(family), RotationConfig(random=True))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quarot_preserves_float_outputs_and_keeps_r4_after_quantization(family):
    model = make_model(family)
    rotated = _check_preserved(model, QuaRotConfig(kv_cache_quant=False, random2=True))
    down = rotated.model.layers[0].mlp.down_proj
    assert down.input_rotation.dtype == torch.int8 and down.input_rotation.shape == (128, 128)
    # Through the whole pipeline (QuantLinear insertion) the online R4 still applies.
    q = copy.deepcopy(model)
    cfg = Config(global_quant_config=QuantizationConfig(weight=INT8_PER_CHANNEL_SPEC), exclude=["lm_head"],
                 pre_quant_opt_config=[QuaRotConfig(kv_cache_quant=False)])
    ModelQuantizer(cfg).quantize_model(q, X)
    with torch.no_grad():
        err_rot = float((q(X[0]).logits - model(X[0]).logits).abs().max())
        assert err_rot < 0.5, err_rot  # wrong (missing) R4 would give an unrelated model


def test_optimized_rotation_file(tmp_path):
    model = make_model("llama")
    r1 = orthogonal_rotation(64, random=True, seed=5).float()
    path = tmp_path / "R.safetensors"
    save_file({"R1": r1.contiguous(), "model.layers.0.self_attn.R2": orthogonal_rotation(16, True, 7).float()},
              str(path))
    rotated = _check_preserved(model, QuaRotConfig(kv_cache_quant=False, had=False, optimized_rotation_path=str(path)))
    emb = model.get_input_embeddings().weight.double()
    assert torch.allclose(rotated.get_input_embeddings().weight.double(), emb @ r1.double(), atol=1e-5)
    with pytest.raises(ValueError, match="safetensors"):
        _check_preserved(model, QuaRotConfig(kv_cache_quant=False, optimized_rotation_path=str(tmp_path / "R.bin")))


def test_refusals_leave_model_unchanged():
    for family, cfg, match in [("opt", RotationConfig(), "RMS"),
                               ("llama", QuaRotConfig(), "kv_cache_quant"),
                               ("phi3", QuaRotConfig(kv_cache_quant=False), "v_proj")]:
        model = make_model(family)
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=match):
            apply_pre_quant_optimization(model, [cfg], Config(global_quant_config=QuantizationConfig()), X, "cpu")
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
