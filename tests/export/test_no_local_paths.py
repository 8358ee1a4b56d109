"""Exports carry no local paths, and write ``version`` / KV ``scale_type`` as amd-quark 0.13 does.

A model loaded from a folder records that folder in ``config._name_or_path``; every export
layout (hf_format and the custom modes fp8 / awq / compressed-tensors, GGUF's ``general.name``)
must write the hub id instead, or nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from quark.torch import ModelExporter
from quark.torch.export.config.config import ExporterConfig
from quark.torch.export.hf_format.writer import public_model_id
from quark.torch.llm.summary import SUMMARY_FILE, RunSummary
from tests.export.helpers import frozen_model

MARKER = "secret-user"
# custom mode -> a template scheme that mode can write
MODES = {"quark": "int4_wo_32", "fp8": "fp8", "awq": "uint4_wo_32", "compressed-tensors": "fp8"}


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-8B", "gpt2", "Qwen/Qwen2.5-0.5B-Instruct", "a_b-c.d/e"])
def test_hub_ids_are_kept(name):
    assert public_model_id(name) == name


@pytest.mark.parametrize("name", ["/home/secret-user/llama", "./llama", "../models/llama", "~/llama", "a/b/c",
                                  "C:\\models\\llama", "org--x/y", "a..b", "-a/b", "a/b.", "", None])
def test_paths_and_non_ids_are_dropped(name):
    assert public_model_id(name) is None


def test_a_relative_path_that_exists_here_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert public_model_id("models/llama") == "models/llama"
    (tmp_path / "models" / "llama").mkdir(parents=True)
    assert public_model_id("models/llama") is None


def _export(tmp_path: Path, mode: str, name_or_path: str, kv: bool = False) -> Path:
    model, config = frozen_model(MODES[mode], kv=kv)
    model.config._name_or_path = name_or_path
    out = tmp_path / f"{mode}-export"
    ModelExporter(ExporterConfig(), out).export_safetensors_model(model, config, custom_mode=mode)
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_no_export_file_holds_the_local_source_path(tmp_path, mode):
    source = tmp_path / MARKER / "models" / "tiny-llama"
    source.mkdir(parents=True)
    out = _export(tmp_path, mode, str(source))
    config = json.loads((out / "config.json").read_text())
    assert "_name_or_path" not in config
    for file in out.rglob("*"):
        if file.is_file():
            assert MARKER.encode() not in file.read_bytes(), file.name


@pytest.mark.parametrize("mode", list(MODES))
def test_the_hub_id_is_written(tmp_path, mode):
    out = _export(tmp_path, mode, "org/tiny-llama")
    assert json.loads((out / "config.json").read_text())["_name_or_path"] == "org/tiny-llama"


def test_version_and_kv_scale_type_as_the_reference_writes_them(tmp_path):
    out = _export(tmp_path, "quark", "org/tiny-llama", kv=True)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["version"] == "0.13"
    assert set(qc["kv_cache_quant_config"]) == {"*k_proj", "*v_proj"}
    for pattern in ("*k_proj", "*v_proj"):
        assert qc["kv_cache_quant_config"][pattern]["output_tensors"]["scale_type"] is None
        assert qc["layer_quant_config"][pattern]["output_tensors"]["scale_type"] is None
        # the weights keep the scheme's own spec
        assert qc["layer_quant_config"][pattern]["weight"]["scale_type"] == "float"
    assert qc["global_quant_config"]["weight"]["scale_type"] == "float"


def test_gguf_name_is_not_the_local_path(tmp_path):
    from tests.conftest import PACKAGE_ASSETS

    model, _ = frozen_model("uint4_wo_32")
    model.config._name_or_path = str(tmp_path / MARKER / "tiny-llama")
    out = ModelExporter(ExporterConfig(), tmp_path / "gguf").export_gguf_model(
        model, PACKAGE_ASSETS / "stories260K", "llama")
    reader = gguf.GGUFReader(str(out))
    field = reader.fields["general.name"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    assert MARKER.encode() not in out.read_bytes()


def test_run_summary_written_beside_an_export_has_no_local_paths(tmp_path):
    home = f"/home/{MARKER}"
    summary = RunSummary(model=f"{home}/models/Llama-3.2-1B", model_type="llama", mode="quantize",
                         dataset=f"{home}/data/calib.jsonl", output_dir=f"{home}/out",
                         exports={"hf_format": f"{home}/out", "onnx": f"{home}/out/onnx"})
    written = json.loads(summary.write(tmp_path).read_text())
    assert MARKER not in json.dumps(written)
    assert (written["model"], written["dataset"], written["output_dir"]) == ("Llama-3.2-1B", "calib.jsonl", ".")
    assert written["exports"] == {"hf_format": ".", "onnx": "onnx"}
    assert summary.to_dict()["model"] == f"{home}/models/Llama-3.2-1B"  # the in-memory summary keeps them
    hub = RunSummary(model="meta-llama/Llama-3.2-1B", model_type="llama", mode="quantize", dataset="pileval")
    assert json.loads(hub.write(tmp_path).read_text())["model"] == "meta-llama/Llama-3.2-1B"
    assert (tmp_path / SUMMARY_FILE).exists()
