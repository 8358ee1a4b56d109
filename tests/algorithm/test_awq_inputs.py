"""AWQ's streamed input statistics, the covariance form of a linear's output error, the inputs the
search holds, and its per-candidate losses reduced over ranks before they are compared.

References are written here: token-by-token sums in float64 on the concatenated tokens.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from tiny_models import make_batches, make_model

from quark.torch import ModelQuantizer
from quark.torch.algorithm.awq import awq, inputs
from quark.torch.algorithm.awq.awq import N_GRID, clip_search, group_input_covariance
from quark.torch.algorithm.awq.inputs import group_input_stats, output_error
from quark.torch.algorithm.utils import tokens
from quark.torch.algorithm.utils.gram import gram
from quark.torch.algorithm.utils.quant import WeightGrid
from quark.torch.quantization.config.config import AWQConfig, Config, QuantizationConfig
from quark.torch.quantization.config.custom_config import UINT4_PER_GROUP_ASYM_SPEC
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType


def _tokens(n: int = 300, cols: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=gen) * (torch.rand(cols, generator=gen) * 2 + 0.2)
    x[7] *= 400.0  # a massive token: capped in the clipping covariance, kept in the others
    return x


@pytest.mark.parametrize("gram_rows", [2048, 5])  # one product per chunk, or chunks in pieces of 5 tokens
def test_streamed_statistics_equal_the_concatenated_tokens_reference(gram_rows: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inputs, "GRAM_ROWS", gram_rows)
    x = _tokens()
    pieces = [x[:13].reshape(1, 13, -1), x[13:200], x[200:]]  # calls of any shape and split
    stats = group_input_stats(pieces, [16, 32], full=True, token_chunk=37)
    xd = x.double()
    assert stats.tokens == stats.local_tokens == 300
    torch.testing.assert_close(stats.mean_abs().double(), xd.abs().mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.full_cov.double(), xd.T @ xd, rtol=1e-5, atol=1e-3)
    capped = tokens.capped_tokens(x).double()
    assert not torch.equal(capped, xd)
    for size in (16, 32):
        cov = stats.covariance(size).double()
        for g in range(64 // size):
            xg = capped[:, g * size:(g + 1) * size]
            torch.testing.assert_close(cov[g], xg.T @ xg / 300, rtol=1e-5, atol=1e-5)


def test_statistics_do_not_depend_on_how_calls_are_split() -> None:
    """Merged or per-sample calibration calls give the same bits (chunks run across call boundaries)."""
    x = _tokens(n=256)
    whole = group_input_stats([x], [16], full=True, token_chunk=48)
    split = group_input_stats(list(x.split(32)), [16], full=True, token_chunk=48)
    assert torch.equal(whole.abs_sum, split.abs_sum) and torch.equal(whole.full_cov, split.full_cov)
    assert torch.equal(whole.block_cov[16], split.block_cov[16])
    assert torch.equal(group_input_covariance(x, 16, token_chunk=48), whole.covariance(16))


def test_output_error_is_the_token_by_token_squared_error() -> None:
    x = _tokens(cols=48)
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(20, 48, generator=gen) * 1e-2
    reference = float(((x.double() @ delta.double().T) ** 2).sum())
    got = float(output_error(delta, group_input_stats([x], [16], full=True).full_cov, torch.float32))
    assert got == pytest.approx(reference, rel=1e-5)


def test_clip_errors_equal_those_of_the_generic_fake_quantization(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast layout (ranges from the unclipped groups) picks the clip of the generic per-ratio path, bit for bit."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(3, 24, 64, generator=gen)
    w[..., 5] *= 6.0
    cov = torch.stack([group_input_covariance(_tokens(seed=s), 16) for s in range(3)])
    grids = [WeightGrid(Dtype.uint4, QSchemeType.per_group, 16, False, RoundType.half_even),
             WeightGrid(Dtype.int4, QSchemeType.per_group, 16, True, RoundType.half_even),
             WeightGrid(Dtype.fp4, QSchemeType.per_group, 16, True, RoundType.half_even),
             WeightGrid(Dtype.int8, QSchemeType.per_channel, 64, True, RoundType.half_even)]
    for grid in grids:
        c = cov if grid.group_size == 16 else torch.stack([group_input_covariance(_tokens(seed=s), 64)
                                                           for s in range(3)])
        fast = clip_search(w, c, grid, oc_chunk=5)
        monkeypatch.setattr(awq, "_clip_errors", awq._block_clip_errors)
        generic = clip_search(w, c, grid, oc_chunk=5)
        monkeypatch.undo()
        assert torch.equal(fast, generic), grid


def test_search_holds_only_the_inputs_later_groups_read_and_reduces_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    held: list[set[str]] = []
    reduced: list[tuple[int, ...]] = []
    real_stats, real_reduce = awq.group_input_stats, awq.all_reduce_
    steps: list[awq.AwqStep] = []
    real_search = awq.AwqStep.search

    def search(self, *args, **kwargs):
        steps.append(self)
        return real_search(self, *args, **kwargs)

    def stats(*args, **kwargs):
        held.append(set(steps[-1].inputs))
        return real_stats(*args, **kwargs)

    def reduce(t, op="sum"):
        reduced.append(tuple(t.shape))
        return real_reduce(t, op)

    monkeypatch.setattr(awq.AwqStep, "search", search)
    monkeypatch.setattr(awq, "group_input_stats", stats)
    monkeypatch.setattr(awq, "all_reduce_", reduce)
    config = Config(global_quant_config=QuantizationConfig(weight=replace(UINT4_PER_GROUP_ASYM_SPEC, group_size=32)),
                    exclude=["lm_head"], algo_config=AWQConfig())
    ModelQuantizer(config).quantize_model(make_model("llama"), make_batches(4, seq=32, seed=1))
    attn, o, mlp, down = "self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"
    everything = {attn, "self_attn.q_proj", o, mlp, "mlp.gate_proj", down}
    # the linear groups' statistics first (v -> o, up -> down), then their inputs go; each search drops
    # the inputs no later group reads
    assert held[:4] == [everything, everything, {attn, "self_attn.q_proj", mlp, "mlp.gate_proj"},
                        {mlp, "mlp.gate_proj"}]
    assert reduced and set(reduced) == {(N_GRID, 2)} and len(reduced) == len(held)


def test_linear_groups_losses_are_the_token_by_token_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each linear-only group's losses equal the mean squared output error measured on the tokens."""
    seen: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    real = awq.output_error

    def spy(delta, cov, dtype):
        got = real(delta, cov, dtype)
        seen.append((delta, cov, float(got)))
        return got

    monkeypatch.setattr(awq, "output_error", spy)
    config = Config(global_quant_config=QuantizationConfig(weight=replace(UINT4_PER_GROUP_ASYM_SPEC, group_size=32)),
                    exclude=["lm_head"], algo_config=AWQConfig())
    ModelQuantizer(config).quantize_model(make_model("llama"), make_batches(2, seq=32, seed=1))
    assert len(seen) == 2 * 2 * N_GRID  # o_proj and down_proj groups, two layers
    for delta, cov, got in seen[:N_GRID]:
        d = delta.double()
        assert got == pytest.approx(float(torch.einsum("oi,ij,oj->", d, cov.double(), d)), rel=1e-5)


def test_streaming_in_small_chunks_is_as_good_as_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Statistics summed over many token chunks (as on 65,536 tokens) are as good as one chunk's.

    Not bit for bit: float sums in another order move a few roundings of the candidates, and AWQ's
    choices with them (the noise band of its discrete search), so the output errors are compared.
    """
    spec = replace(UINT4_PER_GROUP_ASYM_SPEC, group_size=32)
    config = Config(global_quant_config=QuantizationConfig(weight=spec), exclude=["lm_head"], algo_config=AWQConfig())
    rtn_config = Config(global_quant_config=QuantizationConfig(weight=spec), exclude=["lm_head"])
    model, batches, held_out = make_model("qwen2"), make_batches(4, seq=32, seed=1), make_batches(4, seq=32, seed=2)

    def error(config: Config) -> float:
        q = ModelQuantizer(config).quantize_model(copy.deepcopy(model), batches)
        with torch.no_grad():
            return sum(float(((q(b).logits - model(b).logits) ** 2).mean()) for b in held_out)

    whole, rtn = error(config), error(rtn_config)
    monkeypatch.setattr(inputs, "TOKEN_CHUNK", 24)
    chunked = error(config)
    assert chunked < rtn and whole < rtn
    assert chunked == pytest.approx(whole, rel=0.1), (chunked, whole, rtn)


def test_gram_of_a_batch_is_each_matrix_s_own() -> None:
    x = _tokens(n=40, cols=48).reshape(40, 3, 16).transpose(0, 1)
    batched = gram(x)
    for g in range(3):
        torch.testing.assert_close(batched[g], x[g].T @ x[g])
    with pytest.raises(ValueError, match="gram"):
        gram(torch.zeros(3))


@pytest.mark.gpu
def test_half_precision_statistics_and_errors_on_gpu() -> None:
    """bf16 tokens on a GPU: sums within the tensor cores' float32 accumulation, output errors within bf16 rounding."""
    x = _tokens(n=4096, cols=256).bfloat16()
    stats = group_input_stats([x.cuda()], [64], full=True, token_chunk=1000)
    xd = x.double()
    full = xd.T @ xd
    # the tensor cores' float32 accumulation: 1.1e-5 of the largest entry measured on an H200 (2026-12-07),
    # far inside bf16's own rounding of the tokens (4e-3)
    assert float((stats.full_cov.cpu().double() - full).abs().max() / full.abs().max()) < 1e-4
    gen = torch.Generator().manual_seed(4)
    delta = torch.randn(128, 256, generator=gen) * 1e-2
    reference = float(((xd @ delta.double().T) ** 2).sum())
    got = float(output_error(delta.cuda(), stats.full_cov, torch.bfloat16))
    assert got == pytest.approx(reference, rel=2e-2)
    assert inputs.TOKEN_CHUNK > 0
