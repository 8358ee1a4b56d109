"""Out of device memory inside a decoder layer: retried with the batches one by one, then with the
activations in CPU memory (``calibration/oom.py``); injected on CPU by raising torch.OutOfMemoryError.

Each retried run must give the frozen model of a run that never ran out of memory and ran its
batches one by one (what the retries fall back to), and the layers done before are not run again.
"""

from __future__ import annotations

import logging

import pytest
import torch

from quark.torch import LLMTemplate, ModelQuantizer
from quark.torch.algorithm.gptq import gptq as gptq_module
from quark.torch.quantization import api
from quark.torch.quantization.calibration import batching
from tests.helpers.tiny_models import tiny_model, token_batches


class _OutOfMemory:
    """Forward pre-hook raising torch.OutOfMemoryError: at the ``n``-th call of each ``(kind, n)`` of
    ``plan`` in turn, counting calls of that kind ("merged": batch > 1, "single", "any") from the
    previous failure on."""

    def __init__(self, plan: list[tuple[str, int]]) -> None:
        self.plan, self.calls, self.raised = list(plan), 0, 0

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.plan:
            return
        hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        kind, n = self.plan[0]
        if kind != "any" and (hidden.shape[0] > 1) != (kind == "merged"):
            return
        self.calls += 1
        if self.calls == n:
            self.plan.pop(0)
            self.calls = 0
            self.raised += 1
            raise torch.OutOfMemoryError("injected: CUDA out of memory")


def _run(case: dict, *, merge: bool, monkeypatch: pytest.MonkeyPatch, hook: _OutOfMemory | None = None,
         layer: int = 1, layerwise: bool = False) -> tuple[dict[str, torch.Tensor], list[int]]:
    model = tiny_model("llama")
    runs = [0, 0]

    def count(index: int):
        def hook(module, args, kwargs):
            runs[index] += 1
        return hook

    for index in (0, 1):
        model.model.layers[index].register_forward_pre_hook(count(index), with_kwargs=True)
    if hook is not None:
        model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    with monkeypatch.context() as patch:
        patch.setattr(batching, "MERGE_ON_CPU", merge)
        if layerwise:
            patch.setattr(api, "on_device", lambda module, device: False)
        quantizer = ModelQuantizer(LLMTemplate.get("llama").get_config(**case))
        quantizer.quantize_model(model, token_batches(4))
        quantizer.freeze(model)
    return {k: v.clone() for k, v in model.state_dict().items()}, runs


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        bits = (lambda t: t.view(torch.uint8)) if a[key].dtype.itemsize == 1 else (lambda t: t)
        assert torch.equal(bits(a[key]), bits(b[key])), key


GPTQ = dict(scheme="int4_wo_32", algorithm="gptq")


def test_run_layerwise_retries_a_merged_layer_one_batch_at_a_time(monkeypatch, caplog):
    reference, ref_runs = _run(GPTQ, merge=False, monkeypatch=monkeypatch)
    # the 1st merged call of layer 1 checks the merge; the 2nd (collecting) runs out of memory
    hook = _OutOfMemory([("merged", 2)])
    with caplog.at_level(logging.WARNING):
        state, runs = _run(GPTQ, merge=True, monkeypatch=monkeypatch, hook=hook)
    assert hook.raised == 1
    assert "ran out of device memory with merged calibration batches; retrying it with the batches one by one" \
        in caplog.text
    _assert_same(reference, state)
    assert runs[0] <= ref_runs[0] + 2  # layer 0 (done before) ran no second time: only the merge check's extra calls


def test_run_layerwise_then_keeps_the_activations_in_cpu_memory(monkeypatch, caplog):
    reference, _ = _run(GPTQ, merge=False, monkeypatch=monkeypatch)
    hook = _OutOfMemory([("merged", 2), ("single", 1)])  # merged, then the one-by-one retry, run out
    with caplog.at_level(logging.WARNING):
        state, _ = _run(GPTQ, merge=True, monkeypatch=monkeypatch, hook=hook)
    assert hook.raised == 2
    assert "retrying it with the calibration activations in CPU memory" in caplog.text
    _assert_same(reference, state)


def test_out_of_memory_while_a_layer_changes_restores_it_before_the_retry(monkeypatch):
    reference, _ = _run(GPTQ, merge=False, monkeypatch=monkeypatch)
    calls = {"n": 0}

    def failing(real):
        def solve(*args, **kwargs):
            calls["n"] += 1
            # per layer: q/k/v stacked, o_proj, gate/up stacked, down_proj; the 6th is layer 1's o_proj,
            # after its q/k/v weights were already written
            if calls["n"] == 6:
                raise torch.OutOfMemoryError("injected: CUDA out of memory")
            return real(*args, **kwargs)

        return solve

    monkeypatch.setattr(gptq_module, "gptq_quantize", failing(gptq_module.gptq_quantize))
    monkeypatch.setattr(gptq_module, "gptq_quantize_stacked", failing(gptq_module.gptq_quantize_stacked))
    state, _ = _run(GPTQ, merge=False, monkeypatch=monkeypatch)
    assert calls["n"] > 6
    _assert_same(reference, state)


def test_out_of_memory_the_retries_cannot_avoid_is_raised_and_the_model_restored(monkeypatch):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.model.layers[1].register_forward_pre_hook(_OutOfMemory([("any", 1)] * 3), with_kwargs=True)
    with pytest.raises(torch.OutOfMemoryError):
        ModelQuantizer(LLMTemplate.get("llama").get_config(**GPTQ)).quantize_model(model, token_batches(4))
    _assert_same(before, model.state_dict())


FP8 = dict(scheme="fp8", kv_cache_scheme="fp8")


def test_forward_layerwise_retries_one_by_one_then_with_activations_in_cpu_memory(monkeypatch, caplog):
    reference, _ = _run(FP8, merge=False, monkeypatch=monkeypatch, layerwise=True)
    hook = _OutOfMemory([("merged", 2), ("single", 1)])  # after the merge check: the merged pass, then one by one
    with caplog.at_level(logging.WARNING):
        state, _ = _run(FP8, merge=True, monkeypatch=monkeypatch, hook=hook, layerwise=True)
    assert hook.raised == 2
    assert "running the batches one by one from here on" in caplog.text
    assert "keeping the calibration activations in CPU memory from here on" in caplog.text
    _assert_same(reference, state)
