"""compressed-tensors layout, loaded by transformers through the compressed-tensors package."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from quark.torch import ModelExporter
from quark.torch.export.config.config import ExporterConfig
from tests.export.helpers import frozen_model, logits

pytest.importorskip("compressed_tensors", reason="the compressed-tensors package is not installed")


@pytest.mark.parametrize(("scheme", "fmt"), [("fp8", "float-quantized"), ("int8", "int-quantized"),
                                             ("int4_wo_32", "pack-quantized")])
def test_compressed_tensors_loader_gives_identical_logits(tmp_path, scheme, fmt):
    model, config = frozen_model(scheme)
    out = tmp_path / scheme
    ModelExporter(ExporterConfig(), out).export_safetensors_model(model, config, custom_mode="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt and qc["ignore"] == ["lm_head"]
    # run_compressed: compressed-tensors' own quantized forward (activation quantization included)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(run_compressed=True))
    assert torch.equal(logits(loaded), logits(model))


def test_w4a16_decompressed_weights_equal_ours(tmp_path):
    model, config = frozen_model("int4_wo_64")
    out = tmp_path / "w4"
    ModelExporter(ExporterConfig(), out).export_safetensors_model(model, config, custom_mode="compressed-tensors")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(run_compressed=False))
    ours = model.model.layers[1].mlp.down_proj.quantized_weight(torch.float32)
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.weight, ours)


@pytest.mark.parametrize("scheme", ["uint4_wo_32", "mxfp4"])
def test_unsupported_schemes_are_refused(tmp_path, scheme):
    model, config = frozen_model(scheme)
    with pytest.raises(ValueError, match=r"compressed-tensors.*supported: fp8_e4m3"):
        ModelExporter(ExporterConfig(), tmp_path / "o").export_safetensors_model(
            model, config, custom_mode="compressed-tensors")
