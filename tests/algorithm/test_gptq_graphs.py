"""GPTQ's column loop replayed as a CUDA graph gives the eager loop's bits (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from quark.torch.algorithm import kernels
from quark.torch.algorithm.gptq import columns
from quark.torch.algorithm.gptq.math import accumulate_hessian, gptq_quantize
from quark.torch.algorithm.utils.quant import WeightGrid
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType

pytestmark = pytest.mark.gpu

GRIDS = {
    "int4_g64_sym": (WeightGrid(Dtype.int4, QSchemeType.per_group, 64, True, RoundType.half_even), 40),
    "uint4_g32_asym": (WeightGrid(Dtype.uint4, QSchemeType.per_group, 32, False, RoundType.half_even), 0),
    "int8_per_channel": (WeightGrid(Dtype.int8, QSchemeType.per_channel, 320, True, RoundType.half_even), 10),
    "fp8_per_tensor": (WeightGrid(Dtype.fp8_e4m3, QSchemeType.per_tensor, 320, True, RoundType.half_even), 0),
}


def _problem(out: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=gen)
    x = torch.randn(1024, cols, generator=gen) * (torch.rand(cols, generator=gen) * 3 + 0.1)
    h, _ = accumulate_hessian(None, 0, x)
    return w.cuda(), h.cuda()


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch: pytest.MonkeyPatch):
    # integer grids take the Triton column kernel on CUDA; these tests are about the CUDA-graph path
    monkeypatch.setattr(kernels, "USE_TRITON", False)
    columns.clear_graph_cache()
    yield
    columns.clear_graph_cache()
    columns.USE_CUDA_GRAPHS = True


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("desc_act", [True, False])
def test_graph_replay_is_bit_identical_to_the_eager_loop(name: str, desc_act: bool) -> None:
    grid, clip = GRIDS[name]
    # 320 columns: two full 128-column blocks and a 64-column tail (a second captured shape)
    for seed in (0, 1):  # the second weight replays the graphs captured for the first
        w, h = _problem(48, 320, seed)
        columns.USE_CUDA_GRAPHS = False
        eager = gptq_quantize(w, h, grid, desc_act=desc_act, static_groups=True, clip_steps=clip)
        columns.USE_CUDA_GRAPHS = True
        graphed = gptq_quantize(w, h, grid, desc_act=desc_act, static_groups=True, clip_steps=clip)
        assert torch.equal(graphed.weight, eager.weight)
        assert torch.equal(graphed.scale, eager.scale) and torch.equal(graphed.zero_point, eager.zero_point)
        assert graphed.loss == eager.loss
    captured = [entry for entry in columns._graphs.values() if entry is not None]
    assert len(captured) == 2  # one per block width, reused across both weights


def test_dynamic_groups_stay_eager() -> None:
    grid = WeightGrid(Dtype.uint4, QSchemeType.per_group, 32, False, RoundType.half_even)
    w, h = _problem(32, 256, 3)
    graphs_allowed = gptq_quantize(w, h, grid, desc_act=False, static_groups=False)
    assert not columns._graphs  # groups ranged inside the block: nothing to capture
    columns.USE_CUDA_GRAPHS = False
    eager = gptq_quantize(w, h, grid, desc_act=False, static_groups=False)
    assert torch.equal(graphs_allowed.weight, eager.weight)


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(columns, "MAX_CACHED_GRAPHS", 2)
    grid = GRIDS["int4_g64_sym"][0]
    for rows in (8, 16, 24):
        w, h = _problem(rows, 128, rows)
        gptq_quantize(w, h, grid, desc_act=True, static_groups=True)
    assert [key[1] for key in columns._graphs] == [16, 24]
