"""GPTQ of linears that share a Hessian (q/k/v, gate/up) in one call, bit-identical to separate calls;
the half-precision Hessian GEMM of a GPU against the float32 one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_models import make_batches, make_model

from quark.torch import ModelQuantizer
from quark.torch.algorithm.gptq import gptq as gptq_module
from quark.torch.algorithm.gptq.math import accumulate_hessian, gptq_quantize, gptq_quantize_stacked, stackable
from quark.torch.algorithm.utils.quant import WeightGrid
from quark.torch.quantization.config.config import Config, GPTQConfig, QuantizationConfig
from quark.torch.quantization.config.custom_config import INT4_PER_GROUP_SYM_SPEC
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType

COLS = 128
GRIDS = {
    "int4_g32_sym": WeightGrid(Dtype.int4, QSchemeType.per_group, 32, True, RoundType.half_even),
    "uint4_g32_asym": WeightGrid(Dtype.uint4, QSchemeType.per_group, 32, False, RoundType.half_even),
    "int8_per_channel": WeightGrid(Dtype.int8, QSchemeType.per_channel, COLS, True, RoundType.half_even),
    "fp8_per_channel": WeightGrid(Dtype.fp8_e4m3, QSchemeType.per_channel, COLS, True, RoundType.half_even),
    "mxfp4": WeightGrid(Dtype.mx, QSchemeType.per_group, 32, True, RoundType.half_even, kind="mx",
                        element=Dtype.fp4),
}


def _problem(seed: int, device: str = "cpu") -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(rows, COLS, generator=gen) * 0.05 for rows in (96, 32, 32)]
    x = torch.randn(512, COLS, generator=gen) * (torch.rand(COLS, generator=gen) * 3 + 0.1)
    x[:, 5] = 0.0  # a dead input
    h, _ = accumulate_hessian(None, 0, x)
    return [w.to(device) for w in weights], h.to(device)


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("desc_act,static_groups", [(True, True), (False, False), (False, True)])
def test_stacked_call_is_bit_identical_to_one_call_per_weight(name: str, desc_act: bool, static_groups: bool) -> None:
    weights, h = _problem(0)
    options = dict(desc_act=desc_act, static_groups=static_groups, block_size=64, clip_steps=8)
    stacked = gptq_quantize_stacked(weights, h, GRIDS[name], **options)
    for w, got in zip(weights, stacked):
        alone = gptq_quantize(w, h, GRIDS[name], **options)
        assert torch.equal(got.weight, alone.weight)
        assert torch.equal(got.scale, alone.scale) and torch.equal(got.zero_point, alone.zero_point)
        assert got.loss == pytest.approx(alone.loss, rel=1e-6)
        assert got.damp == alone.damp


def test_grids_that_tie_rows_together_are_not_stacked() -> None:
    per_tensor = WeightGrid(Dtype.int8, QSchemeType.per_tensor, COLS, True, RoundType.half_even)
    two_stage = replace(GRIDS["int4_g32_sym"], dtype=Dtype.fp4, scale_dtype=Dtype.fp8_e4m3)
    assert stackable(GRIDS["int4_g32_sym"]) and not stackable(per_tensor) and not stackable(two_stage)
    weights, h = _problem(1)
    with pytest.raises(ValueError, match="per_tensor"):
        gptq_quantize_stacked(weights, h, per_tensor)
    with pytest.raises(ValueError, match="rows"):
        gptq_quantize(torch.cat(weights), h, GRIDS["int4_g32_sym"], rows=[96, 32])


def test_step_quantizes_each_shared_hessian_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Llama q/k/v and gate/up go through one stacked call each; the model equals per-linear calls."""
    calls: list[int] = []
    real = gptq_module.gptq_quantize_stacked

    def spy(weights, *args, **kwargs):
        calls.append(len(weights))
        return real(weights, *args, **kwargs)

    config = Config(global_quant_config=QuantizationConfig(weight=replace(INT4_PER_GROUP_SYM_SPEC, group_size=32)),
                    exclude=["lm_head"], algo_config=GPTQConfig())
    batches = make_batches(4, seq=32, seed=1)
    model = make_model("llama")
    monkeypatch.setattr(gptq_module, "gptq_quantize_stacked", spy)
    stacked = ModelQuantizer(config).quantize_model(make_model("llama"), batches)
    layers = len(model.model.layers)
    assert sorted(calls) == [2] * layers + [3] * layers

    monkeypatch.setattr(gptq_module, "stackable", lambda grid: False)
    alone = ModelQuantizer(config).quantize_model(model, batches)
    ref = alone.state_dict()
    for key, value in stacked.state_dict().items():
        assert torch.equal(value, ref[key]), key


@pytest.mark.gpu
def test_half_precision_hessian_on_gpu_matches_float32() -> None:
    """bf16 tokens on a GPU: one bf16 GEMM with float32 output, within float32 rounding of the float32 sum."""
    gen = torch.Generator().manual_seed(3)
    chunks = [(torch.randn(2048, 512, generator=gen) * 2).bfloat16() for _ in range(3)]
    h_gpu, h_cpu, n_gpu, n_cpu = None, None, 0, 0
    for x in chunks:
        h_gpu, n_gpu = accumulate_hessian(h_gpu, n_gpu, x.cuda())
        h_cpu, n_cpu = accumulate_hessian(h_cpu, n_cpu, x.double())
    assert h_gpu is not None and h_cpu is not None and n_gpu == n_cpu
    assert h_gpu.dtype == torch.float32
    err = (h_gpu.cpu().double() - h_cpu).abs().max() / h_cpu.abs().max()
    assert err < 1e-5, float(err)


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_half_precision_paths_on_a_bf16_model_on_gpu(algorithm: str) -> None:
    """A bf16 model on a GPU takes the half-precision GEMMs (Hessians, AWQ covariances and output errors)."""
    from quark.torch import LLMTemplate

    batches = [b.cuda() for b in make_batches(4, seq=32, seed=1)]
    model = make_model("llama").to(torch.bfloat16).cuda()
    with torch.no_grad():
        ref = torch.cat([model(b).logits.float() for b in batches])
    config = LLMTemplate.get("llama").get_config(scheme="int4_wo_32", algorithm=algorithm)
    ModelQuantizer(config).quantize_model(model, batches)
    with torch.no_grad():
        out = torch.cat([model(b).logits.float() for b in batches])
    assert torch.isfinite(out).all() and float((out - ref).norm() / ref.norm()) < 0.5


def test_owners_by_rows_balances_the_rows_over_the_ranks() -> None:
    from quark.torch.quantization.calibration.distributed import owners_by_rows

    assert owners_by_rows([4096, 1024, 1024], 2) == [0, 1, 1]  # q alone, k and v together
    assert owners_by_rows([14336, 14336], 2) == [0, 1]  # gate, up
    assert owners_by_rows([64, 64, 64], 4) == [0, 1, 2]  # a rank may solve nothing
    assert owners_by_rows([10, 30, 20], 1) == [0, 0, 0]
