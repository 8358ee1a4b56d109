"""Scaling ops keep float outputs; the condition evaluator's grammar; automatic discovery."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import make_model
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from quark.torch.algorithm.awq.auto_config import awq_auto_config_helper
from quark.torch.algorithm.utils.condition import evaluate_condition
from quark.torch.algorithm.utils.scaling import fold_norm_into_fcs, scale_fc_fc, scale_norm_fcs

TOL = dict(atol=1e-5, rtol=1e-5)  # float32 rescaling error


@pytest.mark.parametrize("norm_cls", [nn.LayerNorm, LlamaRMSNorm])
def test_scale_norm_into_linears_keeps_output(norm_cls):
    torch.manual_seed(0)
    norm, fcs = norm_cls(16), [nn.Linear(16, 8), nn.Linear(16, 4, bias=False)]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    x = torch.randn(5, 16)
    ref = [fc(norm(x)) for fc in fcs]
    scale_norm_fcs(norm, fcs, torch.rand(16) + 0.1)
    assert all(torch.allclose(fc(norm(x)), r, **TOL) for fc, r in zip(fcs, ref))
    fold_norm_into_fcs(norm, fcs)
    assert torch.all(norm.weight == 1)
    assert all(torch.allclose(fc(norm(x)), r, **TOL) for fc, r in zip(fcs, ref))


def test_scale_fc_fc_with_grouped_query_heads():
    torch.manual_seed(0)
    kv_heads, heads, hd = 2, 4, 8
    v, o = nn.Linear(32, kv_heads * hd), nn.Linear(heads * hd, 32)
    x = torch.randn(3, 32)

    def attn_out(vv):  # each query head reads its kv head's values (attention weights = 1)
        return vv.view(3, kv_heads, hd).repeat_interleave(heads // kv_heads, dim=1).reshape(3, -1)

    ref = o(attn_out(v(x)))
    scale_fc_fc(v, [o], torch.rand(kv_heads * hd) + 0.1, head_dim=hd)
    assert torch.allclose(o(attn_out(v(x))), ref, **TOL)
    up, down = nn.Linear(8, 16), nn.Linear(16, 8)
    gate = torch.randn(3, 16)
    ref = down(gate * up(x[:, :8]))
    scale_fc_fc(up, [down], torch.rand(16) + 0.1)
    assert torch.allclose(down(gate * up(x[:, :8])), ref, **TOL)


def test_condition_evaluator():
    layer = make_model("llama").model.layers[0]
    same = "module.self_attn.v_proj.weight.shape == module.self_attn.o_proj.weight.shape"
    assert evaluate_condition(same, layer) is False  # GQA: v is 32x64, o is 64x64
    assert evaluate_condition("module.self_attn.o_proj.weight.shape[0] == 64 and not 1 > 2", layer)
    assert evaluate_condition("module.mlp.up_proj.weight.shape[-1] <= 63 or 3 != 4", layer)
    assert evaluate_condition(None, layer) and evaluate_condition(" ", layer)
    for bad in ["__import__('os')", "module.__class__", "open('x')", "module.mlp.up_proj.weight.sum() > 0",
                "1 + 1 == 2", "x == 1", "module.mlp[0:1]", "'a' == 'a'", "1.5 > 1", "lambda: 1", "[1] == [1]",
                "module.self_attn.q_proj.weight.shape[module] == 1", "1 ==", "module.nothing == 1"]:
        with pytest.raises(ValueError):
            evaluate_condition(bad, layer)


def test_condition_hasattr_tests_presence_only():
    layer = make_model("llama").model.layers[0]
    assert evaluate_condition("hasattr(module, 'mlp') and hasattr(module.mlp, 'gate_proj')", layer)
    assert not evaluate_condition("hasattr(module, 'moe') and hasattr(module.moe, 'gate_proj')", layer)  # short-circuit
    assert evaluate_condition("not hasattr(module.mlp, 'experts')", layer)
    for bad in ["hasattr(module, '__class__')", "hasattr(module, 'a.b')", "hasattr(module, 1)", "hasattr(module)",
                "hasattr(module, 'mlp', 'x')", "hasattr(module, name='mlp')", "getattr(module, 'mlp')",
                "hasattr(open, 'x')", "hasattr(module.moe, 'gate_proj')"]:
        with pytest.raises(ValueError):
            evaluate_condition(bad, layer)


EXPECTED = {
    "llama": [("input_layernorm", 3, "self_attn"), ("self_attn.v_proj", 1, None),
              ("post_attention_layernorm", 2, "mlp"), ("mlp.up_proj", 1, None)],
    "opt": [("self_attn_layer_norm", 3, "self_attn"), ("self_attn.v_proj", 1, None),
            ("final_layer_norm", 1, None), ("fc1", 1, None)],
    "phi3": [("input_layernorm", 1, None), ("post_attention_layernorm", 1, None)],
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_auto_config_discovers_groups(family):
    cfg = awq_auto_config_helper(make_model(family))
    got = [(g["prev_op"], len(g["layers"]), g["module2inspect"]) for g in cfg["scaling_layers"]]
    assert got == EXPECTED[family]
    assert cfg["embedding_layers"] and cfg["model_decoder_layers"].endswith("layers")
    json.dumps(cfg)


def test_auto_config_command(tmp_path):
    make_model("qwen2").save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-m", "quark.torch.algorithm.awq.auto_config", "--model_dir",
                          str(tmp_path)], capture_output=True, text=True, check=True, timeout=120)
    cfg = json.loads(out.stdout)
    assert cfg["model_decoder_layers"] == "model.layers" and len(cfg["scaling_layers"]) == 4


def test_auto_config_command_refuses_pickled_weights(tmp_path):
    """A folder with only a pickled ``pytorch_model.bin`` is refused (exit 2, the field and the reason named): the
    command reads safetensors only."""
    import torch
    from safetensors.torch import load_file

    make_model("qwen2").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    torch.save(load_file(weights), tmp_path / "pytorch_model.bin")  # a loadable pickle: transformers would read it
    weights.unlink()
    out = subprocess.run([sys.executable, "-m", "quark.torch.algorithm.awq.auto_config", "--model_dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and not out.stdout
    assert "--model_dir" in out.stderr and "safetensors" in out.stderr and "Traceback" not in out.stderr


def test_candidate_slices_tail_then_head_longest_first():
    from quark.torch.algorithm.utils.scaling import candidate_slices

    assert list(candidate_slices(12, [12, 8, 4, 16])) == [(0, 12), (4, 8), (0, 8), (8, 4), (0, 4)]
    assert list(candidate_slices(3, [4])) == []
