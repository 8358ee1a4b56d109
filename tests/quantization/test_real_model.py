"""The real trained stories260K model (shipped in the package): quantization keeps its quality."""

from __future__ import annotations

import logging

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM

from quark.torch import LLMTemplate, ModelQuantizer

logging.getLogger("transformers").setLevel(logging.ERROR)


def stories(stories_dir) -> list[torch.Tensor]:
    sp = spm.SentencePieceProcessor(model_file=str(stories_dir / "tokenizer.model"))
    text = (stories_dir / "calibration.txt").read_text()
    return [torch.tensor([[1, *sp.encode(s.strip())]]) for s in text.split("<|endoftext|>") if s.strip()]


def mean_nll(model, batches) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = model(ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count


@pytest.fixture(scope="module")
def data(request):
    from tests.conftest import PACKAGE_ASSETS

    return PACKAGE_ASSETS / "stories260K", stories(PACKAGE_ASSETS / "stories260K")


def test_float_baseline_matches_asset_readme(data):
    folder, batches = data
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert sum(b.shape[1] - 1 for b in batches) == 1804
    assert mean_nll(model, batches) == pytest.approx(1.266, abs=0.001)


# Measured on this model (float 1.2664): fp8 1.279, fp8 + fp8 KV 1.299, int8 1.276. A 64-wide model with
# 8-wide heads is far more sensitive than a 7B one; the limits leave ~50% headroom over those numbers.
@pytest.mark.parametrize(("scheme", "kv", "limit"), [("fp8", None, 0.02), ("fp8", "fp8", 0.05), ("int8", None, 0.02)])
def test_quantized_nll_stays_close(data, scheme, kv, limit):
    folder, batches = data
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    float_nll = mean_nll(model, batches)
    config = LLMTemplate.get("llama").get_config(scheme=scheme, kv_cache_scheme=kv)
    ModelQuantizer(config).quantize_model(model, batches[:3])
    fake_nll = mean_nll(model, batches)
    ModelQuantizer.freeze(model)
    frozen_nll = mean_nll(model, batches)
    assert float_nll < fake_nll < float_nll + limit
    assert frozen_nll == pytest.approx(fake_nll, abs=1e-4)


def test_group_scheme_on_172_wide_ffn_names_down_proj(data):
    folder, batches = data
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    config = LLMTemplate.get("llama").get_config(scheme="int4_wo_32")
    expected = r"model\.layers\.4\.mlp\.down_proj \(weight, dim -1 = 172\).*fit: \[2, 4, 43, 86, 172\]"
    with pytest.raises(ValueError, match=expected):
        ModelQuantizer(config).quantize_model(model, batches[:1])
    config = LLMTemplate.get("llama").get_config(scheme="int4_wo_32", exclude_layers=["lm_head", "*down_proj"])
    ModelQuantizer(config).quantize_model(model, batches[:1])
    assert mean_nll(model, batches) < 1.6
