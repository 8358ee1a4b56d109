"""Whole-model calibration on merged batches: same scales, fewer forwards, and when it must not merge."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from quark.torch import LLMTemplate, ModelQuantizer
from quark.torch.quantization.calibration import batching
from tests.helpers.tiny_models import tiny_model, token_batches

BATCHES = token_batches(6, seq=16)


@pytest.fixture(autouse=True)
def _merge_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU merging is off by default (``batching.MERGE_ON_CPU``); these tests need it on."""
    monkeypatch.setattr(batching, "MERGE_ON_CPU", True)


def _calibrate(config, merge: bool, monkeypatch: pytest.MonkeyPatch, model=None) -> tuple[dict, int]:
    """(every static scale by name, number of whole-model forwards) after calibrating a tiny Llama."""
    monkeypatch.setattr(batching, "MERGE_TOKENS", 16384 if merge else 0)
    model = model if model is not None else tiny_model("llama")
    calls = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(1), with_kwargs=True)
    ModelQuantizer(config).quantize_model(model, BATCHES)
    scales = {name: buf.clone() for name, buf in model.named_buffers() if name.endswith("quantizer.scale")}
    return scales, len(calls)


def _fp8_kv():
    return LLMTemplate.get("llama").get_config(scheme="fp8", kv_cache_scheme="fp8")


def test_min_max_calibration_runs_merged_with_the_per_batch_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    per_batch, n_per_batch = _calibrate(_fp8_kv(), False, monkeypatch)
    merged, n_merged = _calibrate(_fp8_kv(), True, monkeypatch)
    assert n_per_batch == len(BATCHES)
    # the check runs the first two batches merged, then one by one; the other four run as one call
    assert n_merged == 1 + 2 + 1
    assert per_batch.keys() == merged.keys() and any(k.endswith("k_proj.output_quantizer.scale") for k in merged)
    for name, scale in per_batch.items():
        torch.testing.assert_close(merged[name], scale, rtol=1e-5, atol=0, msg=name)


def test_model_merge_tokens_bounds_each_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "MODEL_MERGE_TOKENS", 32)  # two 16-token batches per forward
    _, n = _calibrate(_fp8_kv(), True, monkeypatch)
    assert n == 1 + 2 + 2  # the check, then the other four batches in two calls


def test_histogram_observers_keep_the_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _fp8_kv()
    config.global_quant_config.input_tensors = replace(config.global_quant_config.input_tensors,
                                                       observer_cls="PerTensorMSEObserver")
    _, n = _calibrate(config, True, monkeypatch)
    assert n == len(BATCHES)


def test_dynamic_per_tensor_activations_keep_the_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _fp8_kv()  # static fp8 KV outputs are still calibrated...
    config.global_quant_config.input_tensors = replace(config.global_quant_config.input_tensors, is_dynamic=True)
    _, n = _calibrate(config, True, monkeypatch)
    assert n == len(BATCHES)  # ...but each batch's own activation range feeds them


def test_a_model_that_mixes_samples_forgets_the_check_and_runs_the_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    def mixing_model():
        model = tiny_model("llama")
        # adds the batch mean to the embeddings: a merged batch changes every sample's output
        model.model.embed_tokens.register_forward_hook(lambda mod, args, out: out + out.mean(0, keepdim=True))
        return model

    reference, _ = _calibrate(_fp8_kv(), False, monkeypatch, mixing_model())
    scales, n = _calibrate(_fp8_kv(), True, monkeypatch, mixing_model())
    assert n == 1 + 2 + len(BATCHES)  # the check, then every batch as given
    for name, scale in reference.items():
        assert torch.equal(scales[name], scale), name  # what the merged check saw was forgotten


def test_batches_of_different_lengths_run_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    global BATCHES
    saved = BATCHES
    BATCHES = token_batches(3, seq=16) + token_batches(3, seq=12, seed=3)
    try:
        _, n = _calibrate(_fp8_kv(), True, monkeypatch)
    finally:
        BATCHES = saved
    assert n == 6


def test_merged_calibration_matches_the_quantized_model_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_model("llama")
    outputs = []
    for merge in (False, True):
        monkeypatch.setattr(batching, "MERGE_TOKENS", 16384 if merge else 0)
        model = copy.deepcopy(base)
        ModelQuantizer(_fp8_kv()).quantize_model(model, BATCHES)
        with torch.no_grad():
            outputs.append(model(BATCHES[0]).logits)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)


def test_a_merged_forward_out_of_memory_runs_the_rest_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    reference, _ = _calibrate(_fp8_kv(), False, monkeypatch)
    monkeypatch.setattr(batching, "MODEL_MERGE_TOKENS", 48)  # the check's 2 batches, then 3 + 1

    def short_of_memory(mod, args, kwargs):
        if _ids(args, kwargs).shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")

    model = tiny_model("llama")
    model.register_forward_pre_hook(short_of_memory, with_kwargs=True)
    scales, n = _calibrate(_fp8_kv(), True, monkeypatch, model)
    # the check, then the four batches one by one (the failed merged call stopped before the counting hook)
    assert n == 1 + 2 + 4
    for name, scale in reference.items():
        torch.testing.assert_close(scales[name], scale, rtol=1e-5, atol=0, msg=name)


def _ids(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input_ids"]


class _DictOutput(torch.nn.Module):
    """A model whose output is a plain dict: nothing per sample to compare."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_model("llama")

    def forward(self, input_ids: torch.Tensor) -> dict:
        return {"hidden": self.inner(input_ids).logits}


def test_outputs_that_cannot_be_compared_run_the_batches_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _fp8_kv()
    config.exclude = ["*lm_head"]
    reference, _ = _calibrate(config, False, monkeypatch, _DictOutput())
    scales, n = _calibrate(config, True, monkeypatch, _DictOutput())
    assert n == 1 + len(BATCHES)  # the merged call whose output could not be compared, then every batch
    for name, scale in reference.items():
        assert torch.equal(scales[name], scale), name


def test_hidden_states_merge_as_views_of_one_tensor_without_a_copy() -> None:
    """The runner keeps layer 0's hidden states as rows of one tensor, and split outputs stay views: merging
    them again is a view of those rows (no copy); calls that are not consecutive rows are concatenated."""
    from quark.torch.quantization.calibration.layerwise import _rows_of_one_tensor

    parts = [torch.randn(b, 8, 4) for b in (1, 2, 1, 3)]
    rows = _rows_of_one_tensor(parts)
    assert all(torch.equal(a, b) for a, b in zip(rows, parts))
    base = rows[0]._base
    assert base is not None and all(r._base is base for r in rows)
    calls = [((r,), {"flag": True}) for r in rows]
    merged = batching.merge_calls(calls, max_tokens=10**6)
    assert merged is not None and len(merged) == 1
    assert merged[0][0][0].data_ptr() == base.data_ptr() and torch.equal(merged[0][0][0], base)
    # a chunk that starts mid-tensor is a view too
    tail = batching.merge_calls(calls[1:], max_tokens=10**6)
    assert tail[0][0][0].data_ptr() == rows[1].data_ptr() and torch.equal(tail[0][0][0], torch.cat(parts[1:]))
    # rows out of order are copied
    swapped = batching.merge_calls([calls[1], calls[0]], max_tokens=10**6)
    assert torch.equal(swapped[0][0][0], torch.cat([parts[1], parts[0]]))
    assert swapped[0][0][0].data_ptr() not in (r.data_ptr() for r in rows)


def test_a_read_only_move_gives_the_original_tensors_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tensors_moved(weights_change=False)``: the parameters get their own tensors back, nothing is copied
    back from the device; with ``weights_change=True`` they are copied back. (The copies are counted: a
    stand-in for the move to a GPU.)"""
    from quark.torch.quantization.calibration import placement

    moves = []

    def fake_transfer(t: torch.Tensor, device, keep_pinned: bool = False) -> torch.Tensor:
        moves.append(str(device))
        return t.clone()

    monkeypatch.setattr(placement, "transfer", fake_transfer)
    lin = torch.nn.Linear(4, 3)
    before = {name: p.data_ptr() for name, p in lin.named_parameters()}
    with placement.tensors_moved([lin], "cuda", weights_change=False):
        assert all(p.data_ptr() != before[name] for name, p in lin.named_parameters())
    assert all(p.data_ptr() == before[name] for name, p in lin.named_parameters())
    assert moves == ["cuda", "cuda"]
    with placement.tensors_moved([lin], "cuda", weights_change=True):
        pass
    assert moves[2:] == ["cuda", "cuda", "cpu", "cpu"]
