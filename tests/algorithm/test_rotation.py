"""Rotation / QuaRot preserve float outputs on every tiny family; Hadamard constructions; clear refusals.

LayerNorm specifics (OPT) are in test_rotation_layernorm.py, the online R3 in test_rotation_r3.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import make_batches, make_model

from quark.torch import ModelQuantizer
from quark.torch.algorithm.api import apply_pre_quant_optimization
from quark.torch.algorithm.rotation.hadamard import hadamard_matrix, mean_preserving_rotation, orthogonal_rotation
from quark.torch.quantization.config.config import Config, QuantizationConfig, QuaRotConfig, RotationConfig
from quark.torch.quantization.config.custom_config import INT8_PER_CHANNEL_SPEC

# Stated tolerance: rotations are computed in float64 and stored in float32 (one rounding per
# tensor), so logits (|x| ~ 3) agree to ~5e-6 (measured 1.5e-6 .. 7e-6); we allow 1e-4 absolute.
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


@pytest.mark.parametrize("n", [1, 2, 12, 64, 768])
@pytest.mark.parametrize("random", [False, True])
def test_mean_preserving_rotation(n, random):
    q = mean_preserving_rotation(n, random=random)
    ones = torch.ones(n, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(q @ q.t(), eye, atol=1e-12) and torch.allclose(q @ ones, ones, atol=1e-12)
    if n >= 64:
        # A single channel is spread over all channels (no entry above a few times 1/sqrt(n)).
        assert float(q.abs().max()) * n ** 0.5 < 6
        assert torch.equal(q, mean_preserving_rotation(n, random=random))  # reproducible


def test_mean_preserving_rotation_without_hadamard():
    q = mean_preserving_rotation(52, random=True)
    ones = torch.ones(52, dtype=torch.float64)
    assert torch.allclose(q @ q.t(), torch.eye(52, dtype=q.dtype), atol=1e-12)
    assert torch.allclose(q @ ones, ones, atol=1e-12)
    assert not torch.allclose(mean_preserving_rotation(64, random=True), mean_preserving_rotation(64))
    with pytest.raises(ValueError, match="no Hadamard matrix of size 52"):
        mean_preserving_rotation(52)


def _check_preserved(model, cfg):
    rotated = copy.deepcopy(model)
    apply_pre_quant_optimization(rotated, [cfg], Config(global_quant_config=QuantizationConfig()), X, "cpu")
    with torch.no_grad():
        for b in X:
            assert torch.allclose(rotated(b).logits, model(b).logits, atol=ATOL)
    assert not torch.allclose(rotated.get_input_embeddings().weight, model.get_input_embeddings().weight)
    return rotated


FAMILIES = ["llama", "qwen2", "mistral", "phi3", "opt"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", [RotationConfig(random=True), RotationConfig(), QuaRotConfig()],
                         ids=["rotation-random", "rotation", "quarot-defaults"])
def test_rotation_and_quarot_preserve_float_outputs(family, cfg):
    rotated = _check_preserved(make_model(family), cfg)
    if isinstance(cfg, QuaRotConfig):  # had=True, kv_cache_quant=True: online R4 and R3 buffers
        layer = rotated.get_decoder().layers[0]
        h3 = layer.self_attn.qk_rotation
        assert h3.dtype == torch.int8 and h3.shape == (16, 16)
        assert torch.equal(h3.double() @ h3.double().t(), 16 * torch.eye(16, dtype=torch.float64))
        r4 = [m.input_rotation for m in layer.modules() if getattr(m, "input_rotation", None) is not None]
        assert len(r4) == 1 and r4[0].dtype == torch.int8 and r4[0].shape == (128, 128)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quarot_keeps_r4_after_quantization(family):
    model = make_model(family)
    rotated = _check_preserved(model, QuaRotConfig(kv_cache_quant=False, random2=True))
    down = rotated.model.layers[0].mlp.down_proj
    assert down.input_rotation.dtype == torch.int8 and down.input_rotation.shape == (128, 128)
    assert getattr(rotated.model.layers[0].self_attn, "qk_rotation", None) is None
    # Through the whole pipeline (QuantLinear insertion) the online R4 still applies.
    q = copy.deepcopy(model)
    cfg = Config(global_quant_config=QuantizationConfig(weight=INT8_PER_CHANNEL_SPEC), exclude=["lm_head"],
                 pre_quant_opt_config=[QuaRotConfig(kv_cache_quant=False)])
    ModelQuantizer(cfg).quantize_model(q, X)
    with torch.no_grad():
        err_rot = float((q(X[0]).logits - model(X[0]).logits).abs().max())
        assert err_rot < 0.5, err_rot  # wrong (missing) R4 would give an unrelated model


def test_phi3_value_slice_of_fused_qkv_is_rotated():
    model = make_model("phi3")
    rotated = _check_preserved(model, QuaRotConfig(kv_cache_quant=False, had=False, random2=True))
    gamma = model.model.layers[0].input_layernorm.weight.detach()
    before = model.model.layers[0].self_attn.qkv_proj.weight.detach() * gamma
    after = rotated.model.layers[0].self_attn.qkv_proj.weight.detach()
    # The norm weight is folded into the columns and R1 rotates them; R2 additionally rotates the
    # value rows only. Gram matrices of the rows are invariant to the column rotation.
    gram_b, gram_a = before @ before.t(), after @ after.t()
    q_and_k = slice(0, 64 + 64)  # 4 query heads and 4 kv heads of 16
    assert torch.allclose(gram_a[q_and_k, q_and_k], gram_b[q_and_k, q_and_k], atol=1e-4)
    assert not torch.allclose(gram_a[128:, 128:], gram_b[128:, 128:], atol=1e-3)


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
    # LayerNorm models need an R1 that keeps the all-ones vector (the stream must stay mean-free).
    with pytest.raises(ValueError, match="all-ones"):
        _check_preserved(make_model("opt"), QuaRotConfig(had=False, optimized_rotation_path=str(path)))


@pytest.mark.parametrize(("family", "cfg", "match"), [
    ("llama", QuaRotConfig(v_proj="self_attn.nope"), r"QuaRotConfig.v_proj='self_attn.nope' is not an nn.Linear"),
    ("llama", QuaRotConfig(v_proj="self_attn.k_proj"), "produces the attention values"),
    ("llama", QuaRotConfig(model_decoder_layers="model.blocks"), "names no module"),
    ("llama", QuaRotConfig(mlp="mlp.down_proj"), "one MLP residual writer"),
])
def test_refusals_leave_model_unchanged(family, cfg, match):
    model = make_model(family)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        apply_pre_quant_optimization(model, [cfg], Config(global_quant_config=QuantizationConfig()), X, "cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(hasattr(m, "qk_rotation") or getattr(m, "input_rotation", None) is not None
                   for m in model.modules())


def test_wrong_structure_is_caught_by_the_final_check_and_undone(monkeypatch):
    from quark.torch.algorithm.rotation import rotation

    class MissingWriter(rotation.Structure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.writers = self.writers[1:]  # forget o_proj: the rotated model would be wrong

    monkeypatch.setattr(rotation, "Structure", MissingWriter)
    model = make_model("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="differ from the original"):
        apply_pre_quant_optimization(model, [QuaRotConfig()], Config(global_quant_config=QuantizationConfig()),
                                     X, "cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    assert not any(hasattr(m, "qk_rotation") or getattr(m, "input_rotation", None) is not None
                   or m._forward_pre_hooks for m in model.modules())


def test_smoothing_listed_before_a_rotation_is_warned(caplog):
    from quark.torch.quantization.config.config import SmoothQuantConfig

    model = make_model("llama")
    config = Config(global_quant_config=QuantizationConfig(weight=INT8_PER_CHANNEL_SPEC), exclude=["lm_head"])
    with caplog.at_level("WARNING", logger="quark.torch.algorithm.api"):
        apply_pre_quant_optimization(model, [SmoothQuantConfig(), RotationConfig()], config, make_batches(2), "cpu")
    assert "runs SmoothQuantConfig before RotationConfig" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="quark.torch.algorithm.api"):
        apply_pre_quant_optimization(make_model("llama"), [RotationConfig(), SmoothQuantConfig()], config,
                                     make_batches(2), "cpu")
    assert "before" not in caplog.text
