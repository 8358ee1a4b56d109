"""Sharded writing and header validation of safetensors_io."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quark.torch.export.safetensors_io import (
    AtomicFolder,
    CheckpointError,
    parse_size,
    plan_shards,
    read_checkpoint,
    write_sharded,
)


def test_parse_size():
    assert parse_size("5GB") == 5 * 1000**3
    assert parse_size("10KiB") == 10 * 1024
    assert parse_size(123) == 123
    for bad in ("", "abc", 0, -1, True):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


def test_plan_shards_keeps_order_and_limit():
    sizes = [("a", 40), ("b", 40), ("c", 40), ("big", 500), ("d", 10)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["big"], ["d"]]


def test_write_sharded_and_read_back(tmp_path):
    tensors = [(f"t{i}", torch.full((10, 10), float(i))) for i in range(5)]
    view = torch.arange(20.0)[5:15]  # a view of a larger storage is written standalone
    tensors.append(("view", view))
    files = write_sharded(tmp_path, tensors, max_shard_size=900)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(files) == 4 and len(set(index["weight_map"].values())) == 3  # 400-byte tensors, 2 per shard
    assert set(index["weight_map"]) == {n for n, _ in tensors}
    loaded, origin = read_checkpoint(tmp_path)
    for name, tensor in tensors:
        assert torch.equal(loaded[name], tensor)
    assert load_file(str(origin["view"]))["view"].shape == (10,)


def test_duplicate_names_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        write_sharded(tmp_path, [("a", torch.ones(1)), ("a", torch.ones(1))])


def test_missing_shard_is_named(tmp_path):
    write_sharded(tmp_path, [(f"t{i}", torch.ones(100)) for i in range(3)], max_shard_size=500)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003"):
        read_checkpoint(tmp_path)


def test_atomic_folder_discards_on_error(tmp_path):
    with pytest.raises(RuntimeError), AtomicFolder(tmp_path / "dest") as folder:
        (folder.path / "x").write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
