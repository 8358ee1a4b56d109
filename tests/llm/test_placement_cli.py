"""quark-quantize's placement choice (--offload) and its bad input."""

from __future__ import annotations

import json

import pytest
import torch

from quark.torch.llm import placement
from quark.torch.llm.model_loading import EMBEDDED_MODEL_DIR


def test_unknown_and_unavailable_offload_are_refused():
    with pytest.raises(ValueError, match="--offload='ram' is not one of: auto, none, cpu, disk"):
        placement.check_offload("ram")
    with pytest.raises(ValueError, match=r"--offload disk .* not available"):
        placement.check_offload("disk")


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


def test_cli_refuses_offload_disk_before_any_work(tmp_path, capsys):
    from quark.torch.llm import cli

    assert cli.main(["--offload", "disk", "--output_dir", str(tmp_path / "out")]) == 2
    assert "--offload disk" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
