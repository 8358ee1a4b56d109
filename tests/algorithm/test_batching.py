"""Merging recorded calibration calls along the batch: same outputs, fewer forwards, safe fallback."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from tiny_models import make_batches, make_model
from torch import nn

from quark.torch import ModelQuantizer
from quark.torch.algorithm.utils.scaling_step import ScalingStep
from quark.torch.quantization.calibration import batching
from quark.torch.quantization.calibration.batching import merge_calls
from quark.torch.quantization.config.config import AutoSmoothQuantConfig, AWQConfig, Config, QuantizationConfig
from quark.torch.quantization.config.custom_config import INT8_PER_TENSOR_SPEC, UINT4_PER_GROUP_ASYM_SPEC

CALIB = make_batches(6, seq=32, seed=1)


@pytest.fixture(autouse=True)
def _merge_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests run on CPU, where merging is off by default (``batching.MERGE_ON_CPU``)."""
    monkeypatch.setattr(batching, "MERGE_ON_CPU", True)


def test_merging_is_off_on_cpu_by_default_and_on_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "MERGE_ON_CPU", False)
    assert not batching.merging_enabled("cpu")
    assert batching.merging_enabled("cuda")
    monkeypatch.setattr(batching, "MERGE_TOKENS", 0)
    assert not batching.merging_enabled("cuda")
HELD_OUT = make_batches(2, seq=32, seed=2)


def test_tensors_with_the_batch_dim_are_concatenated_and_shared_ones_kept() -> None:
    shared = torch.arange(6.0).reshape(1, 6)  # dim0 == batch (1): concatenated
    cache_pos = torch.arange(6)  # no batch dim, same everywhere: kept once
    calls = [((torch.full((1, 6, 3), float(i)),), {"pos": shared, "cache_position": cache_pos, "flag": True,
                                                     "rope": (shared, shared)}) for i in range(5)]
    merged = merge_calls(calls, max_tokens=12)
    assert merged is not None and len(merged) == 3  # 2 + 2 + 1 calls of 6 tokens each
    (x,), kw = merged[0]
    assert x.shape == (2, 6, 3) and torch.equal(x[1], torch.full((6, 3), 1.0))
    assert kw["pos"].shape == (2, 6) and kw["cache_position"] is cache_pos and kw["flag"] is True
    assert kw["rope"][0].shape == (2, 6)
    assert merged[2][0][0].shape == (1, 6, 3)


def test_calls_that_cannot_merge_are_refused() -> None:
    a = ((torch.zeros(1, 4, 2),), {"mask": torch.zeros(4)})
    b = ((torch.zeros(1, 4, 2),), {"mask": torch.ones(4)})  # differs and has no batch dim
    assert merge_calls([a, b]) is None
    c = ((torch.zeros(1, 5, 2),), {})  # another sequence length
    assert merge_calls([((torch.zeros(1, 4, 2),), {}), c]) is None
    assert merge_calls([a]) is None  # nothing to merge
    assert merge_calls([((torch.zeros(1, 4, 2),), {"n": 1}), ((torch.zeros(1, 4, 2),), {"n": 2})]) is None


class _MixesSamples(nn.Module):
    """Normalises over the batch: merging samples changes its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


def test_a_module_that_mixes_samples_keeps_its_recorded_calls() -> None:
    step = ScalingStep([], [])
    calls = [((torch.randn(1, 4, 3),), {}) for _ in range(3)]
    assert step._batched("mix", _MixesSamples(), calls) is calls
    assert step._merge_ok["mix"] is False
    lin = nn.Linear(3, 2)
    merged = step._batched("lin", lin, calls)
    assert len(merged) == 1 and step._merge_ok["lin"] is True


def _count_merges(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"merged": 0}
    real = batching.merge_calls

    def counting(c, max_tokens=None):
        out = real(c, max_tokens)
        calls["merged"] += out is not None
        return out

    monkeypatch.setattr(batching, "merge_calls", counting)
    return calls



def _assert_merged_matches_per_call(model: nn.Module, config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantize copies of ``model`` with merging on, then off; their logits must agree."""
    merged = copy.deepcopy(model)
    ModelQuantizer(config).quantize_model(merged, CALIB)
    with monkeypatch.context() as m:
        m.setattr(batching, "merge_calls", lambda c, max_tokens=0: None)
        single = copy.deepcopy(model)
        ModelQuantizer(config).quantize_model(single, CALIB)
    with torch.no_grad():
        for b in HELD_OUT:
            torch.testing.assert_close(merged(b).logits, single(b).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2", "mistral", "phi3"])
def test_awq_with_merged_calls_gives_the_per_call_model(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(family)
    spec = replace(UINT4_PER_GROUP_ASYM_SPEC, group_size=32)
    config = Config(global_quant_config=QuantizationConfig(weight=spec), exclude=["lm_head"], algo_config=[AWQConfig()])
    counted = _count_merges(monkeypatch)
    _assert_merged_matches_per_call(model, config, monkeypatch)
    assert counted["merged"] > 0


def test_autosmoothquant_keeps_calls_as_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its candidates quantize activations per call (ranges from the call itself): merging would change them."""
    int8 = QuantizationConfig(weight=INT8_PER_TENSOR_SPEC, input_tensors=INT8_PER_TENSOR_SPEC)
    config = Config(global_quant_config=int8, exclude=["lm_head"], pre_quant_opt_config=[AutoSmoothQuantConfig()])
    monkeypatch.setattr(batching, "MODEL_MERGE_TOKENS", 0)  # count the runner's merges, not the final calibration's
    counted = _count_merges(monkeypatch)
    ModelQuantizer(config).quantize_model(make_model("llama"), CALIB)
    assert counted["merged"] == 0


def _decoder_batch_sizes(model: nn.Module) -> list[int]:
    seen: list[int] = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, a, k: seen.append(_hidden(a, k).shape[0]), with_kwargs=True)
    return seen


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def test_gptq_runs_merged_batches_and_matches_per_batch_without_token_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hessian is a sum over tokens: merging batches changes nothing once the massive-token cap is off."""
    from quark.torch.algorithm.utils import tokens
    from quark.torch.quantization.config.config import GPTQConfig
    from quark.torch.quantization.config.custom_config import INT4_PER_GROUP_SYM_SPEC

    monkeypatch.setattr(tokens, "MASSIVE_TOKEN_RATIO", None)
    model = make_model("llama")
    weight = QuantizationConfig(weight=replace(INT4_PER_GROUP_SYM_SPEC, group_size=32))
    config = Config(global_quant_config=weight, exclude=["lm_head"], algo_config=[GPTQConfig()])
    sizes = _decoder_batch_sizes(model)
    _assert_merged_matches_per_call(model, config, monkeypatch)
    assert max(sizes) == len(CALIB)  # the six one-sample batches ran as one


def test_runner_keeps_batches_when_a_merged_call_changes_the_layer_output(monkeypatch: pytest.MonkeyPatch) -> None:
    from quark.torch.quantization.config.config import GPTQConfig
    from quark.torch.quantization.config.custom_config import INT4_PER_GROUP_SYM_SPEC

    monkeypatch.setattr(batching, "same_outputs", lambda run, merged, calls: False)
    model = make_model("llama")
    sizes = _decoder_batch_sizes(model)
    weight = QuantizationConfig(weight=replace(INT4_PER_GROUP_SYM_SPEC, group_size=32))
    config = Config(global_quant_config=weight, exclude=["lm_head"], algo_config=[GPTQConfig()])
    ModelQuantizer(config).quantize_model(model, CALIB)
    assert sizes and max(sizes) == 1


def test_split_like_restores_per_call_outputs() -> None:
    calls = [((torch.full((b, 3, 2), float(i)),), {}) for i, b in enumerate([1, 2, 1, 3])]
    merged = merge_calls(calls, max_tokens=9)
    assert merged is not None and [batching.call_batch(c) for c in merged] == [3, 1, 3]
    parts = batching.split_like([c[0][0] * 2 for c in merged], merged, [1, 2, 1, 3])
    for (args, _), part in zip(calls, parts):
        torch.testing.assert_close(part, args[0] * 2)


def test_merge_tokens_is_read_at_call_time_and_zero_disables(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [((torch.zeros(1, 8, 2),), {}) for _ in range(4)]
    assert len(merge_calls(calls)) == 1
    monkeypatch.setattr(batching, "MERGE_TOKENS", 16)
    assert len(merge_calls(calls)) == 2
    monkeypatch.setattr(batching, "MERGE_TOKENS", 0)
    assert merge_calls(calls) is None


def test_out_of_memory_on_the_merged_call_keeps_the_batches(caplog: pytest.LogCaptureFixture) -> None:
    calls = [((torch.ones(1, 4, 2),), {}) for _ in range(3)]
    merged = merge_calls(calls)

    def run(call):
        if call[0][0].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return call[0][0]

    assert batching.same_outputs(run, merged[0], calls) is False
    assert "ran out of device memory" in caplog.text
    assert batching.same_outputs(lambda c: c[0][0] * 2, merged[0], calls) is True


def test_scaling_searches_merge_small_cpu_calls_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A search replays its calls per candidate: small CPU calls run merged, large ones as given."""
    from quark.torch.algorithm.utils.scaling_step import SMALL_CALL_TOKENS

    monkeypatch.setattr(batching, "MERGE_ON_CPU", False)
    step = ScalingStep([], [])
    module = nn.Linear(8, 4)
    small = [((torch.randn(1, 32, 8),), {}) for _ in range(4)]
    merged = step._batched("small", module, small)
    assert len(merged) == 1 and merged[0][0][0].shape == (4, 32, 8)
    large = [((torch.randn(1, SMALL_CALL_TOKENS + 1, 8),), {}) for _ in range(2)]
    assert step._batched("large", module, large) is large
