"""Bad input: unquantized/unfrozen models, broken folders and files; errors name file and tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quark.torch import LLMTemplate, ModelExporter, ModelImporter, ModelQuantizer
from quark.torch.export.config.config import ExporterConfig, JsonExporterConfig
from quark.torch.export.safetensors_io import CheckpointError
from tests.export.helpers import frozen_model
from tests.helpers.tiny_models import tiny_model, token_batches


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, config = frozen_model("int8")
    out = tmp_path_factory.mktemp("exp") / "int8"
    ModelExporter(ExporterConfig(), out).export_safetensors_model(model, config)
    return out


def _copy(exported, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(exported, dest)
    return dest


def test_unquantized_model_is_refused(tmp_path):
    _, config = frozen_model("int8")
    with pytest.raises(ValueError, match=r"no quantized layer.*quantize_model"):
        ModelExporter(ExporterConfig(), tmp_path / "o").export_safetensors_model(tiny_model("llama"), config)


def test_unfrozen_model_is_refused(tmp_path):
    model = tiny_model("llama")
    config = LLMTemplate.get("llama").get_config(scheme="uint4_wo_32")
    ModelQuantizer(config).quantize_model(model, token_batches(1, 8))
    with pytest.raises(ValueError, match=r"not frozen.*ModelQuantizer.freeze"):
        ModelExporter(ExporterConfig(), tmp_path / "o").export_safetensors_model(model, config)


def test_missing_config_is_refused(tmp_path):
    model, _ = frozen_model("int8")
    with pytest.raises(ValueError, match=r"quant_config"):
        ModelExporter(ExporterConfig(), tmp_path / "o").export_safetensors_model(model)


def test_non_empty_folder_is_not_overwritten(tmp_path, exported):
    model, config = frozen_model("int8")
    dest = _copy(exported, tmp_path)
    before = sorted(p.name for p in dest.iterdir())
    with pytest.raises(ValueError, match=r"not empty.*overwrite=True"):
        ModelExporter(ExporterConfig(), dest).export_safetensors_model(model, config)
    assert sorted(p.name for p in dest.iterdir()) == before
    (dest / "stale.txt").write_text("old")
    ModelExporter(ExporterConfig(), dest).export_safetensors_model(model, config, overwrite=True)
    assert not (dest / "stale.txt").exists() and (dest / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no temporary folder left behind


def test_failed_export_leaves_nothing(tmp_path):
    model, config = frozen_model("int8")
    with pytest.raises(ValueError):
        ModelExporter(ExporterConfig(), tmp_path / "o").export_safetensors_model(model, config, max_shard_size="x")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_export_settings():
    with pytest.raises(ValueError, match=r"pack_method.*reorder, order"):
        JsonExporterConfig(pack_method="zigzag")
    with pytest.raises(ValueError, match=r"weight_format.*real_quantized"):
        JsonExporterConfig(weight_format="int")


def test_truncated_safetensors(tmp_path, exported):
    dest = _copy(exported, tmp_path)
    data = (dest / "model.safetensors").read_bytes()
    (dest / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*truncated"):
        ModelImporter(dest).load_model()


def test_corrupted_header(tmp_path, exported):
    dest = _copy(exported, tmp_path)
    data = bytearray((dest / "model.safetensors").read_bytes())
    data[8:16] = b"\xff" * 8
    (dest / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors"):
        ModelImporter(dest).load_model()


def test_missing_quantization_config(tmp_path, exported):
    dest = _copy(exported, tmp_path)
    cfg = json.loads((dest / "config.json").read_text())
    del cfg["quantization_config"]
    (dest / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json has no 'quantization_config'"):
        ModelImporter(dest).load_model()


@pytest.mark.parametrize("version", ["9.1", "1.0", "banana", None])
def test_unknown_version(tmp_path, exported, version):
    dest = _copy(exported, tmp_path)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["quantization_config"]["version"] = version
    (dest / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"version"):
        ModelImporter(dest).load_model()


def test_shape_mismatch_names_file_and_tensor(tmp_path, exported):
    dest = _copy(exported, tmp_path)
    tensors = load_file(str(dest / "model.safetensors"))
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key] = tensors[key][:, :32].contiguous()
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{key}' has shape \[128, 32\]"):
        ModelImporter(dest).load_model()


def test_missing_and_unexpected_tensors(tmp_path, exported):
    dest = _copy(exported, tmp_path)
    tensors = load_file(str(dest / "model.safetensors"))
    tensors["model.layers.0.mlp.extra_scale"] = torch.ones(())
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"extra_scale"):
        ModelImporter(dest).load_model()
    del tensors["model.layers.0.mlp.extra_scale"]
    del tensors["model.layers.0.mlp.gate_proj.weight_scale"]
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing.*gate_proj.weight_quantizer.scale"):
        ModelImporter(dest).load_model()


def test_no_pickle_files_are_read(tmp_path, exported):
    dest = _copy(exported, tmp_path)
    (dest / "model.safetensors").unlink()
    torch.save({"x": torch.ones(1)}, dest / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"never pickle"):
        ModelImporter(dest).load_model()
    with pytest.raises(ValueError, match=r"saved_format"):
        ModelImporter(dest, saved_format="pth")
