"""Model folders, tokenizer conventions (pad -> eos, left padding, BOS) and the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quark.torch.llm import model_loading as ml


def test_embedded_model_files_and_notice() -> None:
    folder = ml.EMBEDDED_MODEL_DIR
    for name in ("config.json", "model.safetensors", "tokenizer.model", "LICENSE", "NOTICE", "calibration.txt"):
        assert (folder / name).is_file(), name
    assert "CDLA-Sharing-1.0" in (folder / "NOTICE").read_text()
    assert ml.context_length(ml.load_config(folder)) == 512


def test_tokenizer_conventions_for_sentencepiece_folder() -> None:
    info = ml.load_tokenizer(ml.EMBEDDED_MODEL_DIR)
    tok = info.tokenizer
    assert info.add_bos and info.bos_id == 1
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token
    assert ml.encode(info, "Once upon a time")[0] == 1
    assert ml.encode(ml.load_tokenizer(ml.EMBEDDED_MODEL_DIR, add_bos="no"), "Once")[0] != 1
    batch = tok(["a", "a b c d"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tok.pad_token_id  # left padding


def test_bad_bos_mode() -> None:
    with pytest.raises(ValueError, match="auto, yes, no"):
        ml.load_tokenizer(ml.EMBEDDED_MODEL_DIR, add_bos="sometimes")


def test_check_model_dir(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(ValueError, match="neither a model_type nor architectures"):
        ml.check_model_dir(tmp_path)
    assert ml.check_model_dir(ml.EMBEDDED_MODEL_DIR) == ml.EMBEDDED_MODEL_DIR


def test_load_model_eval_no_cache_and_device_errors() -> None:
    model = ml.load_model(ml.EMBEDDED_MODEL_DIR, dtype="float32")
    assert not model.training and model.config.use_cache is False
    assert next(model.parameters()).dtype == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            ml.resolve_device("cuda")
        with pytest.raises(ValueError, match="--multi_gpu needs CUDA"):
            ml.load_model(ml.EMBEDDED_MODEL_DIR, multi_gpu=True)


def test_load_model_never_fetches_hub_kernels(monkeypatch) -> None:
    """transformers' hub kernels (code from the network) stay off, whatever is installed."""
    import transformers

    seen: dict = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    ml.load_model(ml.EMBEDDED_MODEL_DIR, dtype="float32")
    assert seen.get("use_kernels") is False
