"""Text corpora for calibration and evaluation (layer 10).

A corpus is a list of documents (strings). It comes from a local path (a ``.txt`` file, split on
``<|endoftext|>`` when present, else on blank lines; a ``.jsonl`` file of ``{"text": ...}``
objects; a ``.parquet`` file with a ``text`` column; or a folder of such files) or from a hub
name (``pileval``, ``pileval_for_awq_benchmark``, ``wikitext``, ``c4``) read with the
``datasets`` package.

:func:`calibration_samples` draws ``num_samples`` windows of exactly ``seq_len`` tokens: the
documents are shuffled with a seeded generator, tokenized one after another and concatenated,
and the stream is cut into consecutive non-overlapping windows. The same seed, corpus and
tokenizer always give the same samples; a corpus too small for the request is an error.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from quark.torch.llm.model_loading import TokenizerInfo

logger = logging.getLogger(__name__)

STORY_SEPARATOR = "<|endoftext|>"
LOCAL_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class HubDataset:
    """Where a hub corpus lives and how its documents are chosen."""

    path: str
    name: str | None
    split: str
    data_files: str | None = None
    max_doc_tokens: int | None = None  # longer documents are skipped (AWQ's benchmark protocol)


HUB_DATASETS: dict[str, HubDataset] = {
    "pileval": HubDataset("mit-han-lab/pile-val-backup", None, "validation"),
    "pileval_for_awq_benchmark": HubDataset("mit-han-lab/pile-val-backup", None, "validation",
                                            max_doc_tokens=512),
    "wikitext": HubDataset("wikitext", "wikitext-2-raw-v1", "train"),
    "c4": HubDataset("allenai/c4", None, "train", data_files="en/c4-train.00000-of-01024.json.gz"),
}


def dataset_names() -> list[str]:
    return list(HUB_DATASETS)


def check_dataset(dataset: str, owner: str = "--dataset") -> None:
    """Cheap validation before anything is loaded: a hub name or an existing local path."""
    if dataset in HUB_DATASETS:
        return
    path = Path(dataset)
    if not path.exists():
        raise ValueError(f"{owner}={dataset!r} is neither a known dataset ({', '.join(HUB_DATASETS)}) "
                         f"nor an existing file or folder (.txt, .jsonl, .parquet)")
    if path.is_file() and path.suffix.lower() not in LOCAL_SUFFIXES:
        raise ValueError(f"{owner}={dataset!r}: unsupported file type {path.suffix!r}; "
                         f"allowed: {', '.join(LOCAL_SUFFIXES)}")


def split_text(text: str) -> list[str]:
    """Documents of a plain text file: ``<|endoftext|>``-separated, else blank-line-separated."""
    parts = text.split(STORY_SEPARATOR) if STORY_SEPARATOR in text else text.split("\n\n")
    return [p.strip() for p in parts if p.strip()]


def _read_jsonl(path: Path) -> list[str]:
    docs: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {number} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}: line {number} has no string 'text' field (found: {keys})")
            docs.append(row["text"])
    return docs


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise ValueError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
    return [t for t in table.column("text").to_pylist() if isinstance(t, str)]


def _read_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    return split_text(path.read_text(encoding="utf-8"))


def read_local(path: str | Path) -> list[str]:
    """Documents of a local file or of every supported file in a folder (sorted by name)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                  if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: the folder holds no .txt, .jsonl or .parquet file")
    docs = [doc for file in files for doc in _read_file(file) if doc.strip()]
    if not docs:
        raise ValueError(f"{path}: no text found")
    return docs


def read_hub(name: str, split: str | None = None) -> list[str]:
    """Documents of a hub dataset through the ``datasets`` package, or a ``ValueError`` that
    says why it is unavailable and suggests a local path."""
    spec = HUB_DATASETS[name]
    hint = f"pass a local file or folder instead (e.g. --dataset ./corpus.jsonl) for {name!r}"
    try:
        import datasets
    except ImportError:
        raise ValueError(f"dataset {name!r} needs the 'datasets' package (pip install "
                         f"'quark-torch[datasets]') and network access to the Hugging Face hub; {hint}") from None
    try:
        data = datasets.load_dataset(spec.path, spec.name, split=split or spec.split,
                                     data_files=spec.data_files)
    except Exception as exc:  # network, authentication, missing files: all mean "not reachable"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"dataset {name!r} could not be loaded from the Hugging Face hub ({reason}); "
                         f"{hint}") from None
    return [t for t in data["text"] if isinstance(t, str) and t.strip()]


def load_corpus(dataset: str, split: str | None = None) -> list[str]:
    """Documents of a hub name or a local path (see the module docstring)."""
    check_dataset(dataset)
    if dataset in HUB_DATASETS:
        return read_hub(dataset, split)
    return read_local(dataset)


def calibration_samples(docs: list[str], info: TokenizerInfo, *, num_samples: int, seq_len: int,
                        seed: int = 42, max_doc_tokens: int | None = None,
                        source: str = "the corpus") -> list[torch.Tensor]:
    """``num_samples`` LongTensors ``[1, seq_len]`` cut from the seeded shuffle of ``docs``.

    With BOS, each window is BOS followed by ``seq_len - 1`` text tokens.
    """
    for field, value in (("num_calib_data", num_samples), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{field}={value!r} must be a positive integer")
    body = seq_len - 1 if info.add_bos else seq_len
    if body < 1:
        raise ValueError(f"--seq_len={seq_len} leaves no room for text after the BOS token; use >= 2")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    need = num_samples * body
    stream: list[int] = []
    for index in order:
        ids = info.tokenizer(docs[index], add_special_tokens=False)["input_ids"]
        if not ids or (max_doc_tokens is not None and len(ids) > max_doc_tokens):
            continue
        stream.extend(ids)
        if len(stream) >= need:
            break
    if len(stream) < need:
        available = len(stream) // body
        raise ValueError(
            f"calibration corpus too small: {source} has {len(stream)} usable tokens, which give "
            f"{available} window(s) of {seq_len} tokens, but --num_calib_data {num_samples} were asked; "
            "lower --num_calib_data or --seq_len, or use a larger --dataset")
    samples = []
    for i in range(num_samples):
        window = stream[i * body:(i + 1) * body]
        if info.add_bos:
            window = [info.tokenizer.bos_token_id, *window]
        samples.append(torch.tensor([window], dtype=torch.long))
    return samples


def batch_samples(samples: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack consecutive ``[1, seq]`` samples into ``[batch_size, seq]`` batches (last may be smaller)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch_size={batch_size!r} must be a positive integer")
    return [torch.cat(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


__all__ = [
    "HUB_DATASETS",
    "STORY_SEPARATOR",
    "HubDataset",
    "batch_samples",
    "calibration_samples",
    "check_dataset",
    "dataset_names",
    "load_corpus",
    "read_hub",
    "read_local",
    "split_text",
]
