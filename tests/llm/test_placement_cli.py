"""quark-quantize's placement choice (--offload) and its bad input."""

from __future__ import annotations

import json

import pytest
import torch

from quark.torch.llm import placement
from quark.torch.llm.model_loading import EMBEDDED_MODEL_DIR


def test_unknown_offload_and_disk_with_multi_gpu_are_refused():
    with pytest.raises(ValueError, match="--offload='ram' is not one of: auto, none, cpu, disk"):
        placement.check_offload("ram")
    with pytest.raises(ValueError, match=r"--offload disk .* does not combine with --multi_gpu"):
        placement.check_offload("disk", multi_gpu=True)


def test_cpu_device_keeps_the_model_there():
    assert placement.choose_placement(EMBEDDED_MODEL_DIR, torch.device("cpu"), "auto") == "device"
    assert placement.choose_placement(EMBEDDED_MODEL_DIR, torch.device("cpu"), "cpu") == "device"


def test_auto_offloads_when_the_weights_do_not_fit(monkeypatch, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 4096)
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert placement.checkpoint_bytes(tmp_path) == 4096
    assert placement.checkpoint_bytes(tmp_path, "float32") == 8192
    monkeypatch.setattr(placement, "DEVICE_HEADROOM_BYTES", 0)
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8192, 10**12))
    assert placement.choose_placement(tmp_path, gpu, "auto") == "device"
    assert placement.choose_placement(tmp_path, gpu, "auto", dtype="float32") == "cpu"
    assert placement.choose_placement(tmp_path, gpu, "none", dtype="float32") == "device"
    assert placement.choose_placement(tmp_path, gpu, "cpu") == "cpu"
    assert placement.choose_placement(tmp_path, gpu, "auto", dtype="float32", multi_gpu=True) == "device"


def test_auto_picks_disk_when_host_memory_cannot_hold_the_model(monkeypatch, tmp_path, caplog):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 4096)
    monkeypatch.setattr(placement, "HOST_HEADROOM_BYTES", 0)
    monkeypatch.setattr(placement, "host_memory_available", lambda: 4096 + 409)
    assert placement.choose_placement(tmp_path, torch.device("cpu"), "auto") == "device"
    monkeypatch.setattr(placement, "host_memory_available", lambda: 4096)
    with caplog.at_level("INFO", logger="quark.torch.llm.placement"):
        assert placement.choose_placement(tmp_path, torch.device("cpu"), "auto") == "disk"
    assert "the model on disk" in caplog.text and "do not fit" in caplog.text
    assert placement.choose_placement(tmp_path, torch.device("cpu"), "cpu") == "device"
    assert placement.choose_placement(tmp_path, torch.device("cpu"), "disk") == "disk"


@pytest.mark.parametrize("flags, named", [
    (["--offload", "disk", "--model_export", "onnx"], "--model_export onnx (the ONNX exporter"),
    (["--offload", "disk", "--offload_folder", "/nonexistent/folder"], "--offload_folder"),
    (["--offload", "disk", "--multi_gpu"], "--multi_gpu"),
])
def test_cli_refuses_what_the_disk_placement_cannot_do_before_any_work(tmp_path, capsys, flags, named):
    from quark.torch.llm import cli

    assert cli.main([*flags, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert named in err and "--offload" in err
    assert not (tmp_path / "out").exists()


def test_cli_disk_placement_gives_the_export_of_the_model_in_memory(tmp_path):
    """The embedded model quantized from disk (on the CPU): the same files as with --offload none."""
    from quark.torch.llm import cli

    outputs = {}
    for offload in ("none", "disk"):
        out = tmp_path / offload
        assert cli.main(["--offload", offload, "--device", "cpu", "--output_dir", str(out), "--model_export",
                         "hf_format", "--skip_float_evaluation", "--offload_folder", str(tmp_path)]) == 0
        outputs[offload] = out
    summary = json.loads((outputs["disk"] / "quark_summary.json").read_text())
    assert summary["placement"] == "disk, layers on cpu"
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (outputs["none"] / name).read_bytes() == (outputs["disk"] / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("quark-offload-")] == []  # removed


def test_cli_disk_placement_writes_the_gguf_of_the_model_in_memory(tmp_path):
    """The seeds' recipe 5 (uint4 g32 AWQ, GGUF export) from disk: the file written from memory, byte for byte."""
    from quark.torch.llm import cli

    outputs = {}
    for offload in ("none", "disk"):
        out = tmp_path / offload
        assert cli.main(["--offload", offload, "--device", "cpu", "--output_dir", str(out), "--quant_scheme",
                         "w_uint4_per_group_asym", "--group_size", "32", "--quant_algo", "awq", "--unfit_layers",
                         "keep", "--model_export", "gguf", "--skip_float_evaluation", "--skip_evaluation",
                         "--offload_folder", str(tmp_path)]) == 0
        outputs[offload] = out / "gguf" / "llama.gguf"
    assert outputs["none"].read_bytes() == outputs["disk"].read_bytes()
