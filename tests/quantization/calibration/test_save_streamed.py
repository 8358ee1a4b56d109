"""The streaming safetensors writer: files the safetensors library and the project's header parser read back."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quark.torch.quantization.calibration.safetensors_header import read_header, save_streamed


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.down_proj.weight": torch.randn(24, 40, generator=gen).to(torch.bfloat16),
        "a.f32": torch.randn(3, 5, generator=gen),
        "b.f16": torch.randn(7, generator=gen).to(torch.float16),
        "c.int8": torch.randint(-128, 127, (4, 4), generator=gen, dtype=torch.int8),
        "d.uint8": torch.randint(0, 255, (9,), generator=gen, dtype=torch.uint8),
        "e.int32": torch.randint(-1000, 1000, (2, 3), generator=gen, dtype=torch.int32),
        "f.bool": torch.tensor([True, False, True]),
        "g.fp8": torch.randn(6, generator=gen).to(torch.float8_e4m3fn),
        "h.scalar": torch.tensor(2.5),
        "i.empty": torch.zeros(0, 4),
        "j.view": torch.arange(20, dtype=torch.float32).reshape(4, 5)[:, 1:3],  # not contiguous
    }


def test_a_streamed_file_reads_back_bit_for_bit(tmp_path):
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    moved = []
    save_streamed(tensors, path, to_host=lambda t: moved.append(t.shape) or t.cpu())
    assert len(moved) == len(tensors)  # each tensor brought to the host on its own
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert torch.equal(back[key].view(torch.uint8) if value.dtype == torch.float8_e4m3fn else back[key],
                           value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value), key
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    start, header = read_header(path)
    assert start % 8 == 0 and set(header) - {"__metadata__"} == set(tensors)


def test_the_same_bytes_of_tensor_data_as_the_safetensors_library(tmp_path):
    """Each tensor's bytes are its little-endian buffer, as save_file writes them (the header may order keys
    differently)."""
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    save_streamed(tensors, tmp_path / "ours.safetensors")
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    ours, theirs = load_file(str(tmp_path / "ours.safetensors")), load_file(str(tmp_path / "theirs.safetensors"))
    for key in tensors:
        assert ours[key].shape == theirs[key].shape, key
        assert ours[key].reshape(-1).view(torch.uint8).tolist() == theirs[key].reshape(-1).view(torch.uint8).tolist()


def test_a_dtype_safetensors_cannot_store_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"bad.*complex64"):
        save_streamed({"bad": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.safetensors")
    assert not any(tmp_path.iterdir())


def test_a_failed_write_leaves_no_file(tmp_path):
    def failing(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.int8:
            raise RuntimeError("out of memory")
        return t.cpu()

    with pytest.raises(RuntimeError, match="out of memory"):
        save_streamed(_tensors(), tmp_path / "x.safetensors", to_host=failing)
    assert not any(tmp_path.iterdir())
