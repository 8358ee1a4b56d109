"""Calibration corpora: local formats, seeded sampling, exact window length, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quark.torch.llm import datasets as ds
from quark.torch.llm.model_loading import EMBEDDED_MODEL_DIR, load_tokenizer


@pytest.fixture(scope="module")
def info():
    return load_tokenizer(EMBEDDED_MODEL_DIR)


def test_local_formats_agree(tmp_path: Path) -> None:
    docs = ["first story about a cat.", "second story, with a dog.", "third one."]
    (tmp_path / "a.txt").write_text("<|endoftext|>".join(docs))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in docs))
    (tmp_path / "c.raw").write_text("\n\n".join(docs))
    assert ds.read_local(tmp_path / "a.txt") == docs
    assert ds.read_local(tmp_path / "b.jsonl") == docs
    assert ds.read_local(tmp_path / "c.raw") == docs
    assert ds.read_local(tmp_path) == docs * 3  # folder: files sorted by name


def test_jsonl_without_text_field(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1 has no string 'text' field"):
        ds.read_local(tmp_path / "bad.jsonl")


def test_unknown_name_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pileval, pileval_for_awq_benchmark, wikitext, c4"):
        ds.check_dataset("pile")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'"):
        ds.check_dataset(str(tmp_path / "x.csv"))


def test_samples_reproducible_exact_and_from_the_text(info, calib_text: Path) -> None:
    docs = ds.read_local(calib_text)
    a = ds.calibration_samples(docs, info, num_samples=3, seq_len=50, seed=7)
    b = ds.calibration_samples(docs, info, num_samples=3, seq_len=50, seed=7)
    c = ds.calibration_samples(docs, info, num_samples=3, seq_len=50, seed=8)
    assert all(x.equal(y) for x, y in zip(a, b))
    assert not all(x.equal(y) for x, y in zip(a, c))
    assert all(s.shape == (1, 50) and s[0, 0].item() == info.tokenizer.bos_token_id for s in a)
    # the windows are consecutive pieces of the seeded document stream (checked independently)
    import random

    order = list(range(len(docs)))
    random.Random(7).shuffle(order)
    stream = [t for i in order for t in info.tokenizer(docs[i], add_special_tokens=False)["input_ids"]]
    assert a[1][0, 1:].tolist() == stream[49:98]


def test_corpus_too_small(info) -> None:
    with pytest.raises(ValueError, match="corpus too small: tiny has 2 usable tokens, which give 0 window"):
        ds.calibration_samples(["a b"], info, num_samples=1, seq_len=8, source="tiny")


def test_max_doc_tokens_skips_long_documents(info) -> None:
    docs = ["word " * 100, "short text here"]
    short = info.tokenizer(docs[1], add_special_tokens=False)["input_ids"]
    samples = ds.calibration_samples(docs, info, num_samples=1, seq_len=4, max_doc_tokens=10)
    assert len(short) <= 10 < len(info.tokenizer(docs[0], add_special_tokens=False)["input_ids"])
    assert samples[0][0, 1:].tolist() == short[:3]


def test_batches(info) -> None:
    import torch

    samples = [torch.full((1, 4), i) for i in range(5)]
    batches = ds.batch_samples(samples, 2)
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    assert torch.cat(batches).flatten().tolist() == [i for i in range(5) for _ in range(4)]


def test_hub_without_datasets_package_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ValueError, match=r"needs the 'datasets' package.*pass a local file"):
        ds.load_corpus("c4")
