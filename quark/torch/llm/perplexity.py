"""Perplexity (layer 10): two protocols, both reporting the mean negative log-likelihood per token.

``windowed`` (WikiText-2 style): the whole evaluation text is tokenized once, as one string, and
cut into consecutive non-overlapping windows of ``seq_len`` tokens (with BOS, BOS followed by
``seq_len - 1`` text tokens); a shorter last window is scored too. In every window each token
after the first is scored; perplexity is ``exp(total NLL / scored tokens)``. ``max_windows`` keeps
only the first windows (a fixed, stated number on CPU).

``per_document`` (the stories260K in-domain protocol): each document is tokenized separately
(BOS prepended when the tokenizer info says so) and scored on its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quark.torch.llm.datasets import read_hub, split_text
from quark.torch.llm.model_loading import TokenizerInfo, encode
from quark.torch.quantization.calibration import distributed
from quark.torch.quantization.calibration.layer_forward import forward_layerwise
from quark.torch.quantization.calibration.placement import on_device


@dataclass
class PerplexityResult:
    """Mean token NLL (nats) and its perplexity, with what was scored."""

    protocol: str
    nll: float
    perplexity: float
    tokens: int
    windows: int
    seq_len: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _device_of(model: nn.Module) -> torch.device:
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    logits = logits.float()
    ids = ids.to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="sum")
    return float(loss.double()), int(ids[:, 1:].numel())


@torch.no_grad()
def sequence_nll(model: nn.Module, ids: torch.Tensor) -> tuple[float, int]:
    """Summed NLL (float64) of tokens 1..n-1 of each row of ``ids`` ``[batch, n]`` and their count."""
    ids = ids.to(_device_of(model))
    return _nll(model(input_ids=ids, use_cache=False).logits, ids)


#: Sequences scored per layer-by-layer pass: bounds the hidden states kept on the compute device.
LAYERWISE_SEQUENCES = 64


def sequences_nll(model: nn.Module, rows: list[torch.Tensor], compute_device: torch.device | str | None = None,
                  desc: str = "Perplexity") -> list[tuple[float, int]]:
    """:func:`sequence_nll` of each ``[1, n]`` row; a model that is not wholly on ``compute_device`` runs
    one decoder layer at a time there (``LAYERWISE_SEQUENCES`` rows per pass).

    Under a process group of several ranks each rank scores its share of the rows
    (``distributed.shard``) and every rank gets all the rows' results, in order: the sums the callers
    take are then one process's.
    """
    if distributed.active():
        mine = _sequences_nll(model, distributed.shard(rows), compute_device, desc)
        return [score for part in distributed.gather_objects(mine, "perplexity sums") for score in part]
    return _sequences_nll(model, rows, compute_device, desc)


def _sequences_nll(model: nn.Module, rows: list[torch.Tensor], compute_device: torch.device | str | None,
                   desc: str) -> list[tuple[float, int]]:
    if compute_device is None or on_device(model, compute_device):
        return [sequence_nll(model, ids) for ids in tqdm(rows, desc=desc, unit="window", leave=False)]
    results: list[tuple[float, int]] = []
    for first in range(0, len(rows), LAYERWISE_SEQUENCES):
        chunk = rows[first:first + LAYERWISE_SEQUENCES]
        scored: dict[int, tuple[float, int]] = {}

        def score(index: int, output: Any, chunk: list[torch.Tensor] = chunk,
                  scored: dict[int, tuple[float, int]] = scored) -> None:
            scored[index] = _nll(output.logits, chunk[index])

        forward_layerwise(model, chunk, compute_device, tail=score,
                          desc=f"{desc} {first // LAYERWISE_SEQUENCES + 1}/{-(-len(rows) // LAYERWISE_SEQUENCES)}")
        results.extend(scored[i] for i in range(len(chunk)))
    return results


def _result(protocol: str, total: float, count: int, windows: int, seq_len: int | None) -> PerplexityResult:
    if count == 0:
        raise ValueError("perplexity: the evaluation text has fewer than two tokens; nothing to score")
    nll = total / count
    return PerplexityResult(protocol, nll, math.exp(nll), count, windows, seq_len)


def windowed_perplexity(model: nn.Module, token_ids: list[int] | torch.Tensor, seq_len: int,
                        *, bos_id: int | None = None, max_windows: int | None = None,
                        desc: str = "Perplexity", compute_device: torch.device | str | None = None,
                        ) -> PerplexityResult:
    """Perplexity over non-overlapping ``seq_len`` windows of ``token_ids`` (see module docstring).

    ``compute_device``: where the model runs when it is not wholly there (one layer at a time)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"perplexity seq_len={seq_len!r} must be an integer >= 2")
    if max_windows is not None and (isinstance(max_windows, bool) or max_windows < 1):
        raise ValueError(f"perplexity max_windows={max_windows!r} must be a positive integer or None")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    body = seq_len - 1 if bos_id is not None else seq_len
    starts = list(range(0, ids.numel(), body))
    if max_windows is not None:
        starts = starts[:max_windows]
    rows = []
    for start in starts:
        window = ids[start:start + body]
        if bos_id is not None:
            window = torch.cat([torch.tensor([bos_id]), window])
        if window.numel() >= 2:
            rows.append(window.unsqueeze(0))
    scores = sequences_nll(model, rows, compute_device, desc)
    total, count = sum(nll for nll, _ in scores), sum(n for _, n in scores)
    protocol = f"windowed seq_len={seq_len}{' with BOS' if bos_id is not None else ''}"
    return _result(protocol, total, count, len(starts), seq_len)


def per_document_perplexity(model: nn.Module, docs: list[str], info: TokenizerInfo,
                            desc: str = "Perplexity", compute_device: torch.device | str | None = None,
                            ) -> PerplexityResult:
    """Each document tokenized and scored on its own (BOS per ``info``)."""
    rows = [torch.tensor([ids]) for ids in (encode(info, doc) for doc in docs) if len(ids) >= 2]
    scores = sequences_nll(model, rows, compute_device, desc)
    total, count = sum(nll for nll, _ in scores), sum(n for _, n in scores)
    protocol = f"per-document{' with BOS' if info.add_bos else ''}"
    return _result(protocol, total, count, len(docs), None)


def evaluation_text(source: str) -> str:
    """The evaluation text of ``--ppl_dataset``: ``wikitext`` (hub, test split, rows joined by
    blank lines as in GPTQ) or a local text file read as is (e.g. ``wiki.test.raw``)."""
    if source == "wikitext":
        return "\n\n".join(read_hub("wikitext", split="test"))
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"--ppl_dataset={source!r} is neither 'wikitext' nor an existing text file")
    return path.read_text(encoding="utf-8")


def text_perplexity(model: nn.Module, text: str, info: TokenizerInfo, seq_len: int,
                    max_windows: int | None = None, desc: str = "Perplexity",
                    compute_device: torch.device | str | None = None) -> PerplexityResult:
    """Tokenize ``text`` as one string (no special tokens) and run :func:`windowed_perplexity`."""
    ids = info.tokenizer(text, add_special_tokens=False)["input_ids"]
    return windowed_perplexity(model, ids, seq_len, bos_id=info.bos_id, max_windows=max_windows, desc=desc,
                               compute_device=compute_device)


def story_perplexity(model: nn.Module, path: str | Path, info: TokenizerInfo,
                     desc: str = "Perplexity", compute_device: torch.device | str | None = None) -> PerplexityResult:
    """The per-document protocol on an ``<|endoftext|>``-separated file (stories260K's sample)."""
    return per_document_perplexity(model, split_text(Path(path).read_text(encoding="utf-8")), info, desc,
                                   compute_device)


__all__ = [
    "PerplexityResult",
    "evaluation_text",
    "per_document_perplexity",
    "sequence_nll",
    "sequences_nll",
    "story_perplexity",
    "text_perplexity",
    "windowed_perplexity",
]
