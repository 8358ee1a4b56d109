"""hf_format export -> import round trips, the checkpoint layout table, and transformers loading."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from quark.torch import ModelExporter, ModelImporter
from quark.torch.export.config.config import ExporterConfig, JsonExporterConfig
from quark.torch.export.keys import CHECKPOINT_TO_MODULE, TRANSFORMERS_CHECKPOINT_KEYS
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
from tests.export.helpers import frozen_model, logits
from tests.helpers.tiny_models import tiny_model

SCHEMES = [("fp8", True), ("int8", False), ("uint4_wo_32", False), ("int4_wo_64", False),
           ("mxfp4", False), ("mx6", False)]
K = "model.layers.0.self_attn.k_proj."


def _export(tmp_path, scheme, kv, **kwargs):
    model, config = frozen_model(scheme, kv)
    out = tmp_path / scheme
    ModelExporter(ExporterConfig(), out).export_safetensors_model(model, config, **kwargs)
    return model, config, out


def _header(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.mark.parametrize(("scheme", "kv"), SCHEMES)
def test_export_import_identical_logits(tmp_path, scheme, kv):
    model, _, out = _export(tmp_path, scheme, kv)
    ref = logits(model)
    with_float = ModelImporter(out).import_model_info(tiny_model("llama", seed=7))
    without_float = ModelImporter(out).load_model()
    assert torch.equal(logits(with_float), ref)
    assert torch.equal(logits(without_float), ref)
    assert isinstance(without_float.model.layers[1].mlp.down_proj, QuantLinear)


@pytest.mark.parametrize(("scheme", "kv"), [("fp8", True), ("int8", False), ("uint4_wo_32", False),
                                             ("mxfp4", False)])
def test_transformers_loads_our_hf_format(tmp_path, scheme, kv):
    model, _, out = _export(tmp_path, scheme, kv)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(loaded.model.layers[0].self_attn.k_proj).__name__ == "QuantLinear"
    assert torch.equal(logits(loaded), logits(model))


def test_layout_fp8_with_kv_cache(tmp_path):
    model, _, out = _export(tmp_path, "fp8", True)
    header, meta = _header(out)
    assert meta == {"format": "pt"}
    assert header[K + "weight"] == ("F8_E4M3", [32, 64])
    for name in ("weight_scale", "input_scale", "output_scale"):
        assert header[K + name] == ("F32", [])
    assert K + "input_zero_point" not in header and K + "weight_zero_point" not in header
    assert "model.layers.0.self_attn.q_proj.output_scale" not in header
    assert header["lm_head.weight"] == ("F32", [128, 64])  # excluded layer keeps its dtype
    # k and v scales are kept apart (the reference merges them to max(k, v))
    k = model.model.layers[0].self_attn.k_proj.output_quantizer.scale
    v = model.model.layers[0].self_attn.v_proj.output_quantizer.scale
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor(K + "output_scale"), k)
        assert torch.equal(f.get_tensor(K.replace("k_proj", "v_proj") + "output_scale"), v)
    assert not torch.equal(k, v)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qc) == {"quant_method", "version", "quant_mode", "global_quant_config", "layer_quant_config",
                       "layer_type_quant_config", "kv_cache_quant_config", "exclude", "algo_config",
                       "kv_cache_post_rope", "softmax_quant_spec", "export"}
    assert qc["quant_method"] == "quark" and qc["quant_mode"] == "eager_mode"
    assert qc["export"] == {"kv_cache_group": ["*k_proj", "*v_proj"], "min_kv_scale": 0.0,
                            "pack_method": "reorder", "weight_format": "real_quantized",
                            "weight_merge_groups": None}
    assert set(qc["kv_cache_quant_config"]) == {"*k_proj", "*v_proj"}
    assert qc["kv_cache_quant_config"]["*k_proj"]["output_tensors"]["dtype"] == "fp8_e4m3"
    assert qc["global_quant_config"]["weight"]["observer_cls"] == "PerTensorMinMaxObserver"
    assert (out / "generation_config.json").is_file()


def test_layout_int8_static(tmp_path):
    _, _, out = _export(tmp_path, "int8", False)
    header, _ = _header(out)
    assert header[K + "weight"] == ("I8", [32, 64])
    assert header[K + "weight_scale"] == ("F32", [])
    assert header[K + "weight_zero_point"] == ("I8", [])  # written although symmetric
    assert header[K + "input_scale"] == ("F32", [])
    assert header[K + "input_zero_point"] == ("I8", [])


def _unpack_reorder(packed: torch.Tensor) -> torch.Tensor:
    """Independent decode of Quark's "reorder" int32 packing of unsigned nibbles."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    out = torch.empty_like(nibbles)
    for i, col in enumerate(order):
        out[..., col] = nibbles[..., i]
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def test_layout_uint4_group_decodes_to_the_model_weight(tmp_path):
    model, _, out = _export(tmp_path, "uint4_wo_32", False)
    header, _ = _header(out)
    assert header[K + "weight"] == ("I32", [64, 4])  # [in, out/8], transposed
    assert header[K + "weight_scale"] == ("F32", [2, 32])  # [in/g, out]
    assert header[K + "weight_zero_point"] == ("I32", [2, 4])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        q = _unpack_reorder(f.get_tensor(K + "weight")).float()  # [in, out]
        zp = _unpack_reorder(f.get_tensor(K + "weight_zero_point")).float()  # [in/g, out]
        s = f.get_tensor(K + "weight_scale")
    g = 32
    w = (q - zp.repeat_interleave(g, 0)) * s.repeat_interleave(g, 0)
    expected = model.model.layers[0].self_attn.k_proj.quantized_weight(torch.float32)
    assert torch.equal(w.t(), expected)


def test_pack_method_order_round_trip(tmp_path):
    model, config = frozen_model("uint4_wo_32", pack_method="order")
    out = tmp_path / "order"
    cfg = ExporterConfig(json_export_config=JsonExporterConfig(pack_method="order"))
    ModelExporter(cfg, out).export_safetensors_model(model, config)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["export"]["pack_method"] == "order"
    assert torch.equal(logits(ModelImporter(out).load_model()), logits(model))
    with pytest.raises(ValueError, match="pack_method"):
        ModelExporter(ExporterConfig(), tmp_path / "mismatch").export_safetensors_model(model, config)


def test_layout_mxfp4_e8m0(tmp_path):
    model, _, out = _export(tmp_path, "mxfp4", False)
    header, _ = _header(out)
    assert header[K + "weight"] == ("U8", [32, 32])
    assert header[K + "weight_scale"] == ("U8", [32, 2])
    grid = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        packed = f.get_tensor(K + "weight")
        scale = torch.exp2(f.get_tensor(K + "weight_scale").float() - 127)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(32, 64).long()  # low nibble first
    w = grid[codes] * scale.repeat_interleave(32, 1)
    assert torch.equal(w, model.model.layers[0].self_attn.k_proj.quantized_weight(torch.float32))


def test_sharded_export_round_trip(tmp_path):
    model, config = frozen_model("int8")
    out = tmp_path / "sharded"
    ModelExporter(ExporterConfig(), out).export_safetensors_model(model, config, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    assert torch.equal(logits(ModelImporter(out).load_model()), logits(model))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(logits(loaded), logits(model))


def test_min_kv_scale_is_applied_to_kv_scales_only(tmp_path):
    model, config = frozen_model("fp8", kv=True)
    out = tmp_path / "minkv"
    cfg = ExporterConfig(json_export_config=JsonExporterConfig(min_kv_scale=1e3))
    ModelExporter(cfg, out).export_safetensors_model(model, config)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor(K + "output_scale").item() == 1e3
        assert f.get_tensor(K + "input_scale").item() < 1e3


def test_our_key_table_is_the_inverse_of_transformers():
    from transformers.quantizers.quantizer_quark import CHECKPOINT_KEYS

    assert CHECKPOINT_KEYS == TRANSFORMERS_CHECKPOINT_KEYS
    for ckpt, module in CHECKPOINT_KEYS.items():
        assert CHECKPOINT_TO_MODULE[ckpt] == module


def test_transformers_quark_config_uses_our_classes():
    from transformers.utils.quantization_config import QuarkConfig

    _, config = frozen_model("uint4_wo_32")
    qc = {"quant_method": "quark", "version": "0.13.0", **config.to_dict(),
          "export": JsonExporterConfig(pack_method="order").to_dict()}
    parsed = QuarkConfig(**qc)
    assert parsed.quant_config == config
    assert parsed.json_export_config.pack_method == "order"


def test_only_rank_zero_of_a_data_parallel_run_writes(tmp_path, monkeypatch):
    """Every rank may call the exporters; a rank other than 0 returns the path and writes nothing."""
    from quark.torch.quantization.calibration import distributed

    model, config = frozen_model("fp8", True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    exporter = ModelExporter(ExporterConfig(), tmp_path / "out")
    assert exporter.export_safetensors_model(model, config) == tmp_path / "out"
    onnx_path = exporter.export_onnx_model(model, torch.ones(1, 4, dtype=torch.long))
    assert onnx_path == tmp_path / "out" / "quark_model.onnx"
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    exporter.export_safetensors_model(model, config)
    assert (tmp_path / "out" / "model.safetensors").is_file()
