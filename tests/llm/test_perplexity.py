"""Perplexity protocols against straightforward re-computations and the asset README."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quark.torch.llm import perplexity
from quark.torch.llm.model_loading import EMBEDDED_MODEL_DIR, load_model, load_tokenizer


@pytest.fixture(scope="module")
def stories():
    return load_model(EMBEDDED_MODEL_DIR, dtype="float32"), load_tokenizer(EMBEDDED_MODEL_DIR)


def test_stories260k_in_domain_nll_matches_asset_readme(stories, calib_text: Path) -> None:
    model, info = stories
    result = perplexity.story_perplexity(model, calib_text, info)
    # ../shared/assets/README.md: mean NLL 1.266 nats/token over 1,804 tokens (BOS + sentencepiece ids)
    assert result.tokens == 1804
    assert result.nll == pytest.approx(1.266, abs=5e-4)
    assert result.perplexity == pytest.approx(3.55, abs=5e-3)


def test_tokenizer_matches_sentencepiece(stories, calib_text: Path) -> None:
    import sentencepiece as spm

    _, info = stories
    sp = spm.SentencePieceProcessor(model_file=str(EMBEDDED_MODEL_DIR / "tokenizer.model"))
    text = calib_text.read_text().split("<|endoftext|>")[0].strip()
    assert info.add_bos
    assert info.tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_windowed_equals_hand_computation(stories) -> None:
    model, _ = stories
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (70,), generator=gen)
    result = perplexity.windowed_perplexity(model, ids, 32, bos_id=1)
    # reference: windows of 31 text tokens after BOS; every token after each window's first scored
    total, count = 0.0, 0
    for start in range(0, 70, 31):
        window = torch.cat([torch.tensor([1]), ids[start:start + 31]])
        with torch.no_grad():
            logits = model(window[None]).logits[0]
        total += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += window.numel() - 1
    assert result.windows == 3 and result.tokens == count == 70  # with BOS every text token is scored
    assert result.nll == pytest.approx(total / count, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-6)
    capped = perplexity.windowed_perplexity(model, ids, 32, bos_id=1, max_windows=1)
    assert capped.windows == 1 and capped.tokens == 31


def test_windowed_without_bos(stories) -> None:
    model, _ = stories
    ids = torch.arange(3, 3 + 40)
    result = perplexity.windowed_perplexity(model, ids, 20)
    assert result.windows == 2 and result.tokens == 38 and "BOS" not in result.protocol


def test_bad_arguments(stories) -> None:
    model, _ = stories
    with pytest.raises(ValueError, match="seq_len=1"):
        perplexity.windowed_perplexity(model, [1, 2, 3], 1)
    with pytest.raises(ValueError, match="fewer than two tokens"):
        perplexity.windowed_perplexity(model, [5], 8)


def test_wikitext_out_of_domain_is_finite(stories, shared_assets: Path) -> None:
    model, info = stories
    text = (shared_assets / "text/wikitext-2-raw/wiki.test.raw").read_text()[:20000]
    result = perplexity.text_perplexity(model, text, info, 512, max_windows=2)
    assert result.windows == 2 and math.isfinite(result.perplexity) and result.perplexity > 20


def test_layer_by_layer_perplexity_equals_whole_model(stories, calib_text: Path, monkeypatch) -> None:
    """A model not wholly on the compute device is scored one decoder layer at a time: same NLL."""
    from quark.torch.llm import perplexity as ppl

    model, info = stories
    whole = ppl.story_perplexity(model, calib_text, info)
    monkeypatch.setattr(ppl, "on_device", lambda module, device: False)
    monkeypatch.setattr(ppl, "LAYERWISE_SEQUENCES", 2)  # several passes
    layered = ppl.story_perplexity(model, calib_text, info, compute_device="cpu")
    assert layered.tokens == whole.tokens
    assert layered.nll == pytest.approx(whole.nll, rel=1e-9, abs=1e-9)
