"""The Triton kernels (AWQ clip search, GPTQ column block) against their PyTorch twins.

On a GPU (marked ``gpu``) the kernels run compiled; without one, where Triton is installed, they run
through Triton's interpreter in a child process (the interpreter must be chosen before Triton is
imported), where the arithmetic is numpy's and the results are bit-identical to the PyTorch path.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from quark.torch.algorithm import kernels
from quark.torch.algorithm.awq.awq import clip_search, group_input_covariance
from quark.torch.algorithm.gptq.math import accumulate_hessian, gptq_quantize
from quark.torch.algorithm.utils.quant import WeightGrid
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType

GRIDS = [
    WeightGrid(Dtype.int4, QSchemeType.per_group, 32, True, RoundType.half_even),
    WeightGrid(Dtype.uint4, QSchemeType.per_group, 16, False, RoundType.round),
    WeightGrid(Dtype.int8, QSchemeType.per_group, 64, True, RoundType.floor),
]
UINT4_SYMMETRIC = WeightGrid(Dtype.uint4, QSchemeType.per_group, 32, True, RoundType.half_even)  # zero point 8
REPO = Path(__file__).resolve().parents[2]


def _clip_problem(grid: WeightGrid, device: str, out: int = 40, cols: int = 128, batch: int = 3):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(batch, out, cols, generator=gen)
    x = torch.randn(500, cols, generator=gen) * (torch.rand(cols, generator=gen) * 3)
    scales = torch.rand(batch, cols, generator=gen) + 0.5
    return w.to(device), group_input_covariance(x, grid.group_size).to(device), scales.to(device)


def _gptq_problem(device: str, out: int = 70, cols: int = 256):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(out, cols, generator=gen)
    x = torch.randn(600, cols, generator=gen) * (torch.rand(cols, generator=gen) * 3 + 0.1)
    return w.to(device), accumulate_hessian(None, 0, x)[0].to(device)


def _candidates(grid: WeightGrid, device: str, dtype: torch.dtype, kernel_clip: bool):
    """AWQ's candidate weights ``Q(clip(w * s)) / s`` of one problem: (PyTorch ops, fused kernels). The PyTorch
    ops clip through the clip kernel when ``kernel_clip`` (both then share its choices, as on a GPU)."""
    from quark.torch.algorithm.awq import awq

    w, cov, s = _clip_problem(grid, device, out=300 if device == "cuda" else 40, cols=512 if device == "cuda" else 128,
                              batch=2)
    s = s.to(dtype)
    w = (w[0] * 0.05).to(dtype)
    old = kernels.USE_TRITON
    try:
        kernels.USE_TRITON = kernel_clip
        ref = awq._candidate_weights_torch(w[None] * s[:, None, :], s, cov, grid)
        kernels.USE_TRITON = True
        assert awq._fused_candidates_apply(w, grid)
        return ref, awq._fused_candidate_weights(w, s, awq._candidate_covariances(cov, s), grid)
    finally:
        kernels.USE_TRITON = old


def _both(monkeypatch: pytest.MonkeyPatch, fn):
    monkeypatch.setattr(kernels, "USE_TRITON", False)
    reference = fn()
    monkeypatch.setattr(kernels, "USE_TRITON", True)
    return reference, fn()


def test_kernels_stay_off_on_the_cpu_and_for_other_grids() -> None:
    if os.environ.get("QUARK_TRITON") == "interpret":
        pytest.skip("the interpreter runs the kernels on any device")
    grid = GRIDS[0]
    assert not kernels.kernels_apply(torch.zeros(2), grid)
    fp8 = WeightGrid(Dtype.fp8_e4m3, QSchemeType.per_channel, 64, True, RoundType.half_even)
    mx = WeightGrid(Dtype.mx, QSchemeType.per_group, 32, True, RoundType.half_even, kind="mx", element=Dtype.fp4)
    for other in (fp8, mx):
        assert not kernels.kernels_apply(torch.zeros(2), other)


INTERPRETED = textwrap.dedent("""
    import torch
    from quark.torch.algorithm import kernels
    from tests.algorithm import test_kernels as t

    class Patch:
        def setattr(self, obj, name, value):
            setattr(obj, name, value)

    for grid in t.GRIDS:
        w, cov, s = t._clip_problem(grid, "cpu")
        ref, got = t._both(Patch(), lambda: t.clip_search(w, cov, grid, input_scales=s))
        assert torch.equal(ref, got), grid
        ref, got = t._both(Patch(), lambda: t.clip_search(w[0], cov, grid))
        assert torch.equal(ref, got), grid
        w, h = t._gptq_problem("cpu")
        for desc in (False, True):
            run = lambda: t.gptq_quantize(w, h, grid, desc_act=desc, static_groups=True, block_size=64,
                                          clip_steps=10)
            ref, got = t._both(Patch(), run)
            assert torch.equal(ref.weight, got.weight) and ref.loss == got.loss, (grid, desc)
    for dtype in (torch.bfloat16, torch.float32):  # each step rounds to bfloat16 as PyTorch's ops do
        for grid in t.GRIDS + [t.UINT4_SYMMETRIC]:
            ref, got = t._candidates(grid, "cpu", dtype, kernel_clip=False)
            assert got.dtype == dtype and torch.equal(ref, got), (grid, dtype)
    from quark.torch.algorithm.kernels.error import squared_error_sum
    a, b = (torch.randn(3, 1000, generator=torch.Generator().manual_seed(s)).to(torch.bfloat16) for s in (5, 6))
    exact = float((a.double() - b.double()).pow(2).sum())
    assert abs(float(squared_error_sum(a, b)) - exact) <= 1e-6 * exact
    from quark.torch.algorithm.awq import awq
    for kind in ("clip", "candidates"):  # AWQ's warm-up launches match the kernels
        awq._warm_clip_kernels(kind, 16, 17, torch.bfloat16, t.GRIDS[0], torch.device("cpu"))
    for dtype in (torch.bfloat16, torch.float32):  # the final clipping through the candidates' kernel
        for grid in t.GRIDS + [t.UINT4_SYMMETRIC]:
            w, cov, _ = t._clip_problem(grid, "cpu")
            wd = (w[0] * 0.05).to(dtype)
            ref, got = t._both(Patch(), lambda: awq._final_clip(wd, cov, grid))
            assert got.dtype == dtype and torch.equal(ref.to(dtype), got), (grid, dtype)
    for grid in t.GRIDS:  # a bfloat16 weight is read as it is
        w, cov, _ = t._clip_problem(grid, "cpu")
        w16 = (w[0] * 0.05).to(torch.bfloat16)
        ref, got = t._both(Patch(), lambda: t.clip_search(w16, cov, grid))
        assert got.dtype == torch.bfloat16 and torch.equal(ref, got), grid
    print("interpreted kernels equal")
""")


def _run_interpreted(script: str, timeout: int) -> str:
    """Run ``script`` in a child process whose Triton kernels go through Triton's interpreter (chosen before
    Triton is imported); its standard output, after checking that it succeeded."""
    env = {**os.environ, "QUARK_TRITON": "interpret", "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_interpreted_kernels_equal_the_pytorch_paths() -> None:
    assert "interpreted kernels equal" in _run_interpreted(INTERPRETED, timeout=600)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _clip_objective(clipped: torch.Tensor, w: torch.Tensor, cov: torch.Tensor, grid: WeightGrid,
                    scales: torch.Tensor | None) -> float:
    """Σ over candidates and groups of ``e C eᵀ`` with ``e = Q(clipped) - w`` (in the candidates' scaled inputs):
    what the clip search minimises, computed in float64."""
    from quark.torch.algorithm.utils.quant import fake_quant_weight

    total = 0.0
    for b in range(w.shape[0]):
        e = (fake_quant_weight(clipped[b], grid) - w[b]).double()
        if scales is not None:
            e = e / scales[b].double()
        eg = e.reshape(e.shape[0], -1, grid.group_size).transpose(0, 1)  # [G, rows, gs]
        total += float((torch.bmm(eg, cov.double()) * eg).sum())
    return total


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.dtype.name)
def test_clip_kernel_matches_on_the_gpu(grid: WeightGrid, monkeypatch: pytest.MonkeyPatch) -> None:
    w, cov, s = _clip_problem(grid, "cuda", out=300, cols=512)
    # the same errors summed in another order: near-ties between two ratios may go either way (measured on an
    # H100: 0.7% of int4 elements), so the searches are compared by what they minimise
    ref, got = _both(monkeypatch, lambda: clip_search(w, cov, grid, input_scales=s))
    assert (ref != got).float().mean().item() < 0.05
    assert abs(_clip_objective(got, w, cov, grid, s) / _clip_objective(ref, w, cov, grid, s) - 1) < 1e-4
    ref, got = _both(monkeypatch, lambda: clip_search(w[0], cov, grid))
    assert abs(_clip_objective(got[None], w[:1], cov, grid, None) / _clip_objective(ref[None], w[:1], cov, grid, None)
               - 1) < 1e-4


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("grid", [*GRIDS, UINT4_SYMMETRIC], ids=lambda g: f"{g.dtype.name}-{g.symmetric}")
def test_candidate_kernel_matches_on_the_gpu(grid: WeightGrid) -> None:
    """Given the clip kernel's choices, the fused candidate weights equal PyTorch's ops on them bit for bit (the
    division by the scales and every rounding to bfloat16 included)."""
    for dtype in (torch.bfloat16, torch.float32):
        ref, got = _candidates(grid, "cuda", dtype, kernel_clip=True)
        assert torch.equal(ref, got), (dtype, (ref != got).sum().item())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.dtype.name)
def test_column_kernel_matches_on_the_gpu(grid: WeightGrid, monkeypatch: pytest.MonkeyPatch) -> None:
    w, h = _gptq_problem("cuda", out=500, cols=512)
    run = lambda: gptq_quantize(w, h, grid, desc_act=True, static_groups=True, clip_steps=10)  # noqa: E731
    ref, got = _both(monkeypatch, run)
    # a fused multiply-add in the error update may round a column's value across a grid midpoint
    assert (ref.weight != got.weight).float().mean().item() < 1e-2
    assert abs(ref.loss - got.loss) <= 1e-3 * ref.loss


def test_a_kernel_that_cannot_run_falls_back_to_its_twin_once(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kernels, "_FAILED", {})
    calls: list[str] = []

    def broken() -> int:
        calls.append("kernel")
        raise RuntimeError("PassManager::run failed")

    def twin() -> int:
        calls.append("twin")
        return 7

    assert kernels.kernel_or_twin("k", broken, twin) == 7
    assert kernels.kernel_or_twin("k", broken, twin) == 7
    assert calls == ["kernel", "twin", "twin"]  # not tried again
    assert "PyTorch twin" in caplog.text

    def out_of_memory() -> int:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # the runner's retry handles this one
        kernels.kernel_or_twin("other", out_of_memory, twin)


@pytest.mark.gpu
@gpu
def test_squared_error_kernel_matches_float64_on_the_gpu() -> None:
    from quark.torch.algorithm.awq.awq import _squared_error_torch
    from quark.torch.algorithm.kernels.error import squared_error_sum

    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(3000, 4097, device="cuda", generator=gen).to(torch.bfloat16)  # not a multiple of the block
    b = (a.float() + 0.01 * torch.randn(a.shape, device="cuda", generator=gen)).to(torch.bfloat16)
    exact = float((a.double() - b.double()).pow(2).sum())
    assert abs(float(squared_error_sum(a, b)) - exact) <= 1e-6 * exact
    assert abs(float(_squared_error_torch(a, b)) - exact) <= 1e-6 * exact


AWQ_END_TO_END = textwrap.dedent("""
    import sys
    from dataclasses import replace
    import torch
    sys.path.insert(0, "tests/algorithm")
    from tiny_models import make_batches, make_model
    from quark.torch.algorithm import kernels
    from quark.torch.algorithm.awq import awq
    from quark.torch.quantization.config.config import AWQConfig, Config, QuantizationConfig
    from quark.torch.quantization.config.custom_config import UINT4_PER_GROUP_ASYM_SPEC

    used = []
    fused = awq._fused_candidate_weights
    def spy(*args):
        used.append(args[0].shape)
        return fused(*args)
    awq._fused_candidate_weights = spy
    awq._squared_error_sum = awq._squared_error_torch  # its kernel sums in another order
    weights = {}
    for on in (False, True):
        kernels.USE_TRITON = on
        model = make_model("llama").to(torch.bfloat16)
        spec = replace(UINT4_PER_GROUP_ASYM_SPEC, group_size=32)  # symmetric grids: the kernel-level test
        config = Config(global_quant_config=QuantizationConfig(weight=spec), exclude=["lm_head"])
        awq.AwqProcessor(model, AWQConfig(), make_batches(4), quant_config=config).apply()
        weights[on] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert used, "the candidates' kernel never ran"
    start = make_model("llama").to(torch.bfloat16).state_dict()
    changed = [n for n in weights[True] if not torch.equal(weights[True][n], start[n])]
    assert changed, "AWQ changed nothing"
    differ = [n for n in weights[True] if not torch.equal(weights[True][n], weights[False][n])]
    assert not differ, differ
    print("awq end to end equal", len(used), len(changed))
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_awq_through_the_interpreted_candidates_kernel_equals_the_pytorch_path() -> None:
    """A whole AWQ run (tiny bf16 Llama, uint4 g32 asymmetric) with its scale candidates and final
    clipping through the candidates' kernel (Triton's interpreter) gives the weights of the PyTorch path bit for
    bit: the kernel's batches, covariances and final clipping are wired as the twin's."""
    assert "awq end to end equal" in _run_interpreted(AWQ_END_TO_END, timeout=900)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_candidates_kernel_compiles_for_an_h100(dtype: str, symmetric: bool, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled ahead for sm_90 with Triton's own ptxas (no GPU needed), as AWQ launches it on a Llama-3 int4 g128
    weight, so a kernel that would not build on the H100 fails here rather than falling back to its twin there."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from quark.torch.algorithm.kernels.clip import _candidate_weights_kernel

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    pointer = f"*{dtype}"
    signature = {"w_ptr": pointer, "s_ptr": pointer, "cov_ptr": "*fp32", "ratio_ptr": "*fp32", "out_ptr": pointer,
                 "rows": "i32", "cols": "i32", "groups": "i32", "qmin": "fp32", "qmax": "fp32", "divisor": "fp32",
                 "midpoint": "fp32", "eps": "fp32", "clipped_only": "i32"}
    constants = dict(GS=128, BR=32, STEPS=10, BF16=dtype == "bf16", SYMMETRIC=symmetric, METHOD=0,
                     ZERO_FREE=symmetric, EXACT=False, DOT_PRECISION="tf32")
    source = ASTSource(fn=_candidate_weights_kernel, signature={**signature, **dict.fromkeys(constants, "constexpr")},
                       constexprs=constants)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 8, "enable_fp_fusion": False})
    except FileNotFoundError as error:  # a Triton without the NVIDIA toolchain (ptxas)
        pytest.skip(f"no CUDA toolchain in this Triton: {error}")
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
