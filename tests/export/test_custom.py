"""custom_mode fp8 / awq layouts, loaded with the consumers' own code where the CPU allows."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from quark.torch import ModelExporter
from quark.torch.export.config.config import ExporterConfig
from quark.torch.export.main_export.quant_config_parser import QuantConfigParser
from tests.export.helpers import INPUT, frozen_model, logits

K = "model.layers.0.self_attn.k_proj."


def _weights_only_reference(model):
    """The frozen model's dequantized weights in a plain float model (no activation quantization)."""
    ref = transformers.AutoModelForCausalLM.from_config(model.config)
    state = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "QuantLinear":
            state[f"{name}.weight"] = module.quantized_weight(torch.float32)
    for key, value in model.state_dict().items():
        if key not in state and key in ref.state_dict():
            state[key] = value
    ref.load_state_dict(state)
    return ref.eval()


def test_fp8_vllm_names(tmp_path):
    model, config = frozen_model("fp8", kv=True)
    ModelExporter(ExporterConfig(), tmp_path / "o").export_safetensors_model(model, config, custom_mode="fp8")
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None,
                  "ignored_layers": ["lm_head"], "kv_cache_scheme": "static"}
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice(K + "weight").get_dtype() == "F8_E4M3"
        k_scale = f.get_tensor("model.layers.0.self_attn.k_scale")
        v_scale = f.get_tensor("model.layers.0.self_attn.v_scale")
    assert {K + "weight_scale", K + "input_scale"} <= keys
    assert K + "output_scale" not in keys
    attn = model.model.layers[0].self_attn
    assert torch.equal(k_scale, attn.k_proj.output_quantizer.scale)
    assert torch.equal(v_scale, attn.v_proj.output_quantizer.scale)
    # transformers' QuarkConfig path for legacy fp8 dicts
    parsed = QuantConfigParser.from_custom_config(qc)
    assert parsed.exclude == ["lm_head"] and set(parsed.kv_cache_quant_config) == {"*k_proj", "*v_proj"}


def test_fp8_transformers_names_load_in_transformers(tmp_path):
    model, config = frozen_model("fp8", kv=True)
    out = tmp_path / "o"
    ModelExporter(ExporterConfig(), out).export_safetensors_model(model, config, custom_mode="fp8",
                                                                  fp8_scale_names="transformers")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {K + "weight_scale_inv", K + "activation_scale"} <= set(f.keys())
    # on CPU transformers' FineGrainedFP8 dequantizes the weights (its fp8 kernels need a GPU),
    # so it equals the weight-dequantized model without activation quantization
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.allclose(logits(loaded), logits(_weights_only_reference(model)), atol=1e-5)


def test_fp8_refuses_other_schemes(tmp_path):
    model, config = frozen_model("int8")
    with pytest.raises(ValueError, match="fp8"):
        ModelExporter(ExporterConfig(), tmp_path / "o").export_safetensors_model(model, config, custom_mode="fp8")
    assert not (tmp_path / "o").exists()


def _awq_dequantize(qweight, qzeros, scales, group):
    """AutoAWQ's GEMM unpacking (reverse order [0, 4, 1, 5, 2, 6, 3, 7]), written out here."""
    shifts = torch.arange(0, 32, 4)
    reverse = [0, 4, 1, 5, 2, 6, 3, 7]

    def unpack(x):
        v = (x.unsqueeze(-1) >> shifts) & 0xF  # [rows, cols/8, 8]
        v = v.reshape(x.shape[0], -1, 8)[:, :, reverse]
        return v.reshape(x.shape[0], -1)

    w = unpack(qweight).float()
    z = unpack(qzeros).float().repeat_interleave(group, 0)
    s = scales.float().repeat_interleave(group, 0)
    return ((w - z) * s).t()


@pytest.mark.parametrize("scheme", ["uint4_wo_32", "int4_wo_64"])
def test_awq_layout(tmp_path, scheme):
    model, config = frozen_model(scheme)
    out = tmp_path / "o"
    ModelExporter(ExporterConfig(), out).export_safetensors_model(model, config, custom_mode="awq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = 32 if scheme.endswith("32") else 64
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["lm_head"]}
    transformers.AwqConfig.from_dict(dict(qc))  # transformers accepts the config
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        qweight, qzeros, scales = (f.get_tensor(K + n) for n in ("qweight", "qzeros", "scales"))
        assert K + "weight" not in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
    assert qweight.dtype == torch.int32 and list(qweight.shape) == [64, 4]
    assert list(qzeros.shape) == [64 // group, 4] and scales.dtype == torch.float16
    expected = model.model.layers[0].self_attn.k_proj.quantized_weight(torch.float32)
    scale32 = model.model.layers[0].self_attn.k_proj.weight_quantizer.scale.t()
    tol = (scale32.abs().max() * 2 ** -10).item() * 16  # fp16 rounding of the scales only
    assert torch.allclose(_awq_dequantize(qweight, qzeros, scales, group), expected, atol=tol)
    assert INPUT.shape[0] == 1


def test_awq_refuses_activation_quantization(tmp_path):
    model, config = frozen_model("int8")
    with pytest.raises(ValueError, match="awq"):
        ModelExporter(ExporterConfig(), tmp_path / "o").export_safetensors_model(model, config, custom_mode="awq")


def test_custom_config_parser_round_trip():
    _, fp8 = frozen_model("fp8", kv=True)
    assert QuantConfigParser(fp8).get_custom_config()[1] == "fp8"
    _, awq = frozen_model("uint4_wo_32")
    custom, mode = QuantConfigParser(awq).get_custom_config()
    assert mode == "awq"
    assert QuantConfigParser.from_custom_config(custom).global_quant_config == awq.global_quant_config
    _, mx = frozen_model("mxfp4")
    assert QuantConfigParser(mx).get_custom_config() == ({}, "quark")
