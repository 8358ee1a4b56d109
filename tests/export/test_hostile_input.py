"""Hostile checkpoints and configs (issue 15): paths out of the folder, NaN/Inf tensors, malformed
headers/indexes/config.json, bad condition strings. Each ends in a ValueError naming the file,
field or tensor, never another exception, never an echo of a file's content."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quark.torch import LLMTemplate, ModelExporter, ModelImporter
from quark.torch.algorithm.utils.condition import evaluate_condition
from quark.torch.export.config.config import ExporterConfig
from quark.torch.export.main_export.quant_config_parser import QuantConfigParser
from quark.torch.export.safetensors_io import CheckpointError, read_checkpoint, write_sharded
from quark.torch.quantization.config.config import QuaRotConfig
from tests.export.helpers import frozen_model, quantize_and_export
from tests.helpers.tiny_models import tiny_model, token_batches

SECRET = b"SECRET-CONTENT-OF-A-FILE-OUTSIDE"
SCALE = "model.layers.0.mlp.gate_proj.weight_scale"
INPUT_SCALE = "model.layers.0.mlp.gate_proj.input_scale"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, config = frozen_model("int8")
    out = tmp_path_factory.mktemp("hostile") / "int8"
    ModelExporter(ExporterConfig(), out).export_safetensors_model(model, config)
    return out


@pytest.fixture(scope="module")
def quarot_exported(tmp_path_factory):
    config = LLMTemplate.get("llama").get_config(scheme="fp8")
    config.pre_quant_opt_config = [QuaRotConfig(kv_cache_quant=False)]
    out = tmp_path_factory.mktemp("hostile") / "quarot"
    quantize_and_export(tiny_model("llama"), config, token_batches(2), out)
    return out


def _copy(src, tmp_path, name="copy"):
    dest = tmp_path / name
    shutil.copytree(src, dest)
    return dest


def _secret_file(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "secret.safetensors"
    path.write_bytes(struct.pack("<Q", len(SECRET)) + SECRET)
    return path


def _sharded(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    write_sharded(folder, [(f"t{i}", torch.ones(100)) for i in range(3)], max_shard_size=500)
    return folder


def _set_shard(folder, value):
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["t0"] = value
    index.write_text(json.dumps(data))


# -- item 2: reads outside the model folder ------------------------------------------------------------------------
@pytest.mark.parametrize("shard", ["../outside/secret.safetensors", "ABSOLUTE", "sub/../../outside/secret.safetensors"])
def test_index_shard_outside_the_folder_is_refused_unopened(tmp_path, shard):
    secret = _secret_file(tmp_path)
    folder = _sharded(tmp_path)
    (folder / "sub").mkdir()
    _set_shard(folder, str(secret) if shard == "ABSOLUTE" else shard)
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json.*not inside the model folder") as err:
        read_checkpoint(folder)
    assert "SECRET" not in str(err.value)


def test_symlinked_shard_leaving_the_folder_is_refused(tmp_path):
    secret = _secret_file(tmp_path)
    folder = _sharded(tmp_path)
    os.symlink(secret, folder / "link.safetensors")
    _set_shard(folder, "link.safetensors")
    with pytest.raises(CheckpointError, match=r"link.safetensors.*link to a file outside") as err:
        read_checkpoint(folder)
    assert "SECRET" not in str(err.value)


def test_symlinked_single_file_and_config_leaving_the_folder_are_refused(tmp_path, exported):
    secret = _secret_file(tmp_path)
    dest = _copy(exported, tmp_path)
    (dest / "model.safetensors").unlink()
    os.symlink(secret, dest / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"outside") as err:
        ModelImporter(dest).load_model()
    assert "SECRET" not in str(err.value)
    (dest / "config.json").unlink()
    os.symlink(secret, dest / "config.json")
    with pytest.raises(CheckpointError, match=r"config.json.*outside"):
        ModelImporter(dest).load_model()


def test_symlink_inside_the_folder_is_fine(tmp_path):
    folder = _sharded(tmp_path)
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]["t0"]
    os.rename(folder / shard, folder / "real.bin")
    os.symlink("real.bin", folder / shard)
    tensors, _ = read_checkpoint(folder)
    assert sorted(tensors) == ["t0", "t1", "t2"]


# -- item 3: NaN / Inf / overflowing tensors ---------------------------------------------------------------------
def _edit_tensor(folder, name, value):
    tensors = load_file(str(folder / "model.safetensors"))
    tensors[name] = value
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return tensors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", [SCALE, INPUT_SCALE, "model.layers.1.input_layernorm.weight"])
def test_non_finite_tensor_is_refused_by_model_importer(tmp_path, exported, name, bad):
    dest = _copy(exported, tmp_path)
    tensors = load_file(str(dest / "model.safetensors"))
    value = tensors[name].clone()
    value.view(-1)[0] = bad
    _edit_tensor(dest, name, value)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' has 1 NaN/Inf"):
        ModelImporter(dest).load_model()


def test_overflowing_and_zero_scales_are_refused(tmp_path, exported):
    dest = _copy(exported, tmp_path)
    original = load_file(str(dest / "model.safetensors"))[INPUT_SCALE]
    _edit_tensor(dest, INPUT_SCALE, torch.full_like(original, 1e300, dtype=torch.float64))
    with pytest.raises(CheckpointError, match=rf"tensor '{INPUT_SCALE}'.*overflows the model's torch.float32"):
        ModelImporter(dest).load_model()
    _edit_tensor(dest, INPUT_SCALE, torch.zeros_like(original))
    with pytest.raises(CheckpointError, match=rf"tensor '{INPUT_SCALE}' has 1 scale\(s\) <= 0"):
        ModelImporter(dest).load_model()


def test_wrapping_zero_point_is_refused(tmp_path, exported):
    dest = _copy(exported, tmp_path)
    name = "model.layers.0.mlp.gate_proj.weight_zero_point"
    tensors = load_file(str(dest / "model.safetensors"))
    assert tensors[name].dtype == torch.int8  # the model holds it as int8: 2**40 + z wraps to z
    _edit_tensor(dest, name, tensors[name].to(torch.int64) + 2**40)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' holds values that torch.int8 cannot represent"):
        ModelImporter(dest).load_model()


def test_nan_scale_is_refused_in_transformers_before_any_output(tmp_path, exported):
    dest = _copy(exported, tmp_path)
    value = load_file(str(dest / "model.safetensors"))[SCALE].clone()
    value.view(-1)[0] = float("nan")
    _edit_tensor(dest, SCALE, value)
    model = AutoModelForCausalLM.from_pretrained(str(dest))
    for _ in range(2):  # refused every time, not only once
        with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{SCALE}' has 1 NaN/Inf"):
            model(token_batches(1, 8)[0])


def test_clean_checkpoint_still_loads_in_transformers_and_hook_is_removed(exported):
    model = AutoModelForCausalLM.from_pretrained(str(exported))
    with torch.no_grad():
        assert torch.isfinite(model(token_batches(1, 8)[0]).logits).all()
    assert not model._forward_pre_hooks


def test_quarot_checkpoint_without_rotations_is_refused(tmp_path, quarot_exported):
    dest = _copy(quarot_exported, tmp_path)
    tensors = load_file(str(dest / "model.safetensors"))
    kept = {k: v for k, v in tensors.items() if not k.endswith("input_rotation")}
    assert len(kept) < len(tensors)
    save_file(kept, str(dest / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"QuaRot.*holds no \['model.layers.0.mlp.down_proj.input_rotation'"):
        ModelImporter(dest).load_model()
    model = AutoModelForCausalLM.from_pretrained(str(dest))
    with pytest.raises(CheckpointError, match=r"input_rotation' is not a ±1 Hadamard matrix"):
        model(token_batches(1, 8)[0])


def test_quarot_checkpoint_missing_one_rotation_is_refused(tmp_path, quarot_exported):
    dest = _copy(quarot_exported, tmp_path)
    tensors = load_file(str(dest / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.input_rotation"]
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"holds no \['model.layers.1.mlp.down_proj.input_rotation'\]"):
        ModelImporter(dest).load_model()


def test_corrupted_rotation_is_refused(tmp_path, quarot_exported):
    dest = _copy(quarot_exported, tmp_path)
    name = "model.layers.0.mlp.down_proj.input_rotation"
    rotation = load_file(str(dest / "model.safetensors"))[name].clone()
    rotation[0, 0] = 3
    _edit_tensor(dest, name, rotation)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is not a ±1 Hadamard"):
        ModelImporter(dest).load_model()


# -- item 6: malformed headers, indexes, config.json ---------------------------------------------------------------
def _with_header(folder, header: bytes):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])


@pytest.mark.parametrize("header", [
    b"[1, 2]", b'{"a": 5}', b'{"a": {"dtype": "F32", "shape": [' + b"9" * 400 + b'], "data_offsets": [0, 4]}}',
    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}',
    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}',
    b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}',
    b'{"__metadata__": [1]}', b"[" * 100000 + b"]" * 100000, b'{"a": 1' + b"\xff\xfe",
])
def test_malformed_header_is_a_checkpoint_error(tmp_path, exported, header):
    dest = _copy(exported, tmp_path)
    _with_header(dest, header)
    with pytest.raises(CheckpointError, match=r"model.safetensors"):
        ModelImporter(dest).load_model()


@pytest.mark.parametrize("index", [
    b'{"weight_map": ["model.safetensors"]}', b'{"weight_map": {"a": 5}}', b'{"weight_map": {}}', b"[]",
    b"[" * 100000, b'{"weight_map": {"a": "' + b"x" * 5000 + b'"}}', b'{"weight_map": {"a": "' + b"x" * 300 + b'"}}',
    b'{"weight_map": {"a": "model.safetensors\\u0000"}}',
])
def test_malformed_index_is_a_checkpoint_error(tmp_path, index):
    folder = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_bytes(index)
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json") as err:
        read_checkpoint(folder)
    assert len(str(err.value)) < 1000


def _edit_config(folder, edit):
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit", [
    lambda c: c["quantization_config"]["global_quant_config"].update(weight="int8"),
    lambda c: c["quantization_config"]["global_quant_config"]["weight"].update(group_size=2**62,
                                                                               qscheme="per_group"),
    lambda c: c["quantization_config"]["global_quant_config"]["weight"].update(ch_axis=10**400,
                                                                               qscheme="per_channel"),
    lambda c: c["quantization_config"].update(export="reorder"),
    lambda c: c["quantization_config"].update(export={"pack_method": ["x"]}),
    lambda c: c["quantization_config"].update(layer_quant_config=[1]),
    lambda c: c["quantization_config"].update(version=[0, 1]),
    lambda c: c.update(model_type=["llama"]),
    lambda c: c.update(hidden_size="wide"),
])
def test_malformed_config_json_is_a_checkpoint_error(tmp_path, exported, edit):
    dest = _copy(exported, tmp_path)
    _edit_config(dest, edit)
    with pytest.raises(CheckpointError, match=r"config.json"):
        ModelImporter(dest).load_model()


def test_deeply_nested_or_huge_config_json_is_a_checkpoint_error(tmp_path, exported):
    dest = _copy(exported, tmp_path)
    (dest / "config.json").write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        ModelImporter(dest).load_model()
    (dest / "config.json").write_text('{"a": ' + "9" * 5000 + "}")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        ModelImporter(dest).load_model()


@pytest.mark.parametrize("text", [
    "module.self_attn.q_proj.weight.shape[99] == 1", "module[0] == 1", "module.self_attn.q_proj.weight.shape[" +
    "9" * 400 + "] == 1", "module.self_attn.q_proj.weight == module.self_attn.q_proj.weight",
    "module < 3", "not " * 5000 + "1", "(" * 500 + "1" + ")" * 500, "1\x00", "module.self_attn.q_proj.weight.shape",
    "module.mlp.up_proj.weight[0] == 1", "x" * 2000,
])
def test_condition_errors_are_value_errors_naming_the_condition(text):
    layer = tiny_model("llama").model.layers[0]
    with pytest.raises(ValueError, match=r"condition"):
        evaluate_condition(text, layer)


# -- item 7: fp8 / awq config parser -------------------------------------------------------------------------------
def test_ignored_layers_string_is_one_name():
    config = QuantConfigParser.from_custom_config({"quant_method": "fp8", "ignored_layers": "lm_head"})
    assert config.exclude == ["lm_head"]
    config = QuantConfigParser.from_custom_config({"quant_method": "awq", "modules_to_not_convert": "lm_head"})
    assert config.exclude == ["lm_head"]


@pytest.mark.parametrize("custom", [
    {"quant_method": "fp8", "ignored_layers": {"lm_head": 1}},
    {"quant_method": "fp8", "ignored_layers": [1, 2]},
    {"quant_method": "fp8", "activation_scheme": ["static"]},
    {"quant_method": "fp8", "weight_block_size": [128, 128]},
    {"quant_method": "awq", "group_size": 2**62},
    {"quant_method": "awq", "group_size": 1e400},
    {"quant_method": "awq", "group_size": "128"},
    {"quant_method": "awq", "bits": "4"},
    {"quant_method": "awq", "zero_point": "yes"},
    {"quant_method": "awq", "modules_to_not_convert": 5},
    {"quant_method": ["fp8"]},
])
def test_custom_config_errors_name_the_field(custom):
    field = next((k for k in custom if k != "quant_method"), "quant_method")
    with pytest.raises(ValueError, match=field):
        QuantConfigParser.from_custom_config(custom)


def test_nan_embedding_is_refused_in_transformers(tmp_path, exported):
    dest = _copy(exported, tmp_path)
    name = "model.embed_tokens.weight"
    value = load_file(str(dest / "model.safetensors"))[name].clone()
    value[3, 3] = float("inf")
    _edit_tensor(dest, name, value)
    model = AutoModelForCausalLM.from_pretrained(str(dest))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' has 1 NaN/Inf"):
        model(token_batches(1, 8)[0])


def test_first_forward_check_follows_deep_copies(tmp_path, exported):
    import copy

    dest = _copy(exported, tmp_path)
    value = load_file(str(dest / "model.safetensors"))[SCALE].clone()
    value.view(-1)[0] = float("nan")
    _edit_tensor(dest, SCALE, value)
    clone = copy.deepcopy(AutoModelForCausalLM.from_pretrained(str(dest)))
    with pytest.raises(CheckpointError, match=SCALE):
        clone(token_batches(1, 8)[0])
    healthy = copy.deepcopy(AutoModelForCausalLM.from_pretrained(str(exported)))
    healthy(token_batches(1, 8)[0])
    assert not healthy._forward_pre_hooks


@pytest.mark.parametrize("dtype", ["XYZ", ["F32"], 5])
def test_unknown_header_dtype_is_named(tmp_path, exported, dtype):
    dest = _copy(exported, tmp_path)
    header = json.dumps({"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}).encode()
    (dest / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"tensor 'a': header field 'dtype'=.* is not one of: BOOL"):
        read_checkpoint(dest)
