"""Compiling AWQ's Triton kernels ahead of the first layer (``kernels/warmup.py``, ``AwqStep.prepare``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import make_batches, make_model

from quark.torch.algorithm import kernels
from quark.torch.algorithm.awq import awq
from quark.torch.algorithm.kernels.warmup import KernelWarmup, specialised_size, warming_up
from quark.torch.quantization.config.config import AWQConfig, Config, QuantizationConfig
from quark.torch.quantization.config.custom_config import UINT4_PER_GROUP_ASYM_SPEC

REPO = Path(__file__).resolve().parents[2]


def _awq_step(clip_in_scale_search: bool = True) -> awq.AwqStep:
    model = make_model("llama")
    config = Config(global_quant_config=QuantizationConfig(weight=replace(UINT4_PER_GROUP_ASYM_SPEC, group_size=32)),
                    exclude=["lm_head"])
    algo = AWQConfig(clip_in_scale_search=clip_in_scale_search)
    return awq.AwqProcessor(model, algo, make_batches(2), quant_config=config).build_step()[1]


def test_specialised_sizes_keep_what_triton_specialises_on() -> None:
    assert [specialised_size(n) for n in (1, 16, 4096, 14336, 112, 9, 17, 100)] == [1, 16, 16, 16, 16, 17, 17, 17]
    for n in (1, 2, 16, 48, 112, 576, 4096, 100):
        s = specialised_size(n)
        assert (s == 1) == (n == 1) and (s % 16 == 0) == (n % 16 == 0)


def test_the_warm_up_runs_every_call_in_other_threads_and_survives_a_failure(
        caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, bool]] = []
    main = threading.get_ident()

    def call(tag: str):
        def run() -> None:
            assert threading.get_ident() != main
            seen.append((tag, warming_up()))
            if tag == "b":
                raise RuntimeError("no compiler here")
        return run

    with caplog.at_level(logging.DEBUG, logger="quark.torch.algorithm.kernels.warmup"):
        warm = KernelWarmup([call(t) for t in "abcd"], "cpu", "test")
        warm.wait()
    assert sorted(seen) == [("a", True), ("b", True), ("c", True), ("d", True)]
    assert seen[0] == ("a", True)  # no driver to start on a CPU: the first call runs alone, before the others
    assert "no compiler here" in caplog.text
    assert not warming_up()


def test_with_the_driver_started_first_every_call_compiles_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once Triton's driver is up, no call waits for another: all of them are in flight together (a barrier
    that only opens when every call has reached it)."""
    from quark.torch.algorithm.kernels import warmup

    assert not warmup._driver_ready(torch.device("cpu"))  # only a CUDA device has a driver to start
    started: list[str] = []
    monkeypatch.setattr(warmup, "_driver_ready", lambda device: started.append(str(device)) or True)
    barrier = threading.Barrier(4, timeout=10)
    passed: list[int] = []
    KernelWarmup([lambda: passed.append(barrier.wait()) for _ in range(4)], "cpu", "test").wait()
    assert started == ["cpu"] and sorted(passed) == [0, 1, 2, 3]


def test_a_kernel_failing_during_the_warm_up_is_left_to_the_real_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_FAILED", {})

    def broken() -> int:
        raise RuntimeError("PassManager::run failed")

    failures: list[BaseException] = []

    def warm() -> None:
        try:
            kernels.kernel_or_twin("k", broken, lambda: 7)
        except RuntimeError as error:
            failures.append(error)
            raise

    KernelWarmup([warm], "cpu", "test").wait()
    assert len(failures) == 1 and kernels._FAILED == {}  # not remembered: the real call tries the kernel itself
    assert kernels.kernel_or_twin("k", broken, lambda: 7) == 7


@pytest.mark.parametrize("clip_in_scale_search", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_awq_warms_up_one_call_per_kernel_variant(monkeypatch: pytest.MonkeyPatch, clip_in_scale_search: bool,
                                                  fused: bool) -> None:
    step = _awq_step(clip_in_scale_search)
    monkeypatch.setattr(awq, "_clip_kernel_applies", lambda w, grid: True)  # as on a GPU
    monkeypatch.setattr(awq, "_fused_candidates_apply", lambda w, grid: fused)
    calls = awq._warmup_calls(step, step._first_layer, step.active[0], step.grids[0], torch.device("cpu"))
    kinds = [c.args[0] if c.func is awq._warm_clip_kernels else "error" for c in calls]
    # the scale candidates' kernel also does the final clipping; without it, the clip kernel does both
    assert kinds == (["candidates", "error"] if fused else ["clip", "error"])
    # hidden 64 and FFN 128 in groups of 32: every linear has 2 or 4 groups (neither 1 nor a multiple of 16)
    assert {(c.args[1], c.args[2]) for c in calls if c.func is awq._warm_clip_kernels} == {(16, 17)}


def test_the_runner_prepares_each_step_once_before_the_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    from quark.torch.quantization.calibration import layerwise

    events: list[str] = []
    capture = layerwise.capture_decoder_inputs

    def spy_capture(*args, **kwargs):
        events.append("capture")
        return capture(*args, **kwargs)

    monkeypatch.setattr(layerwise, "capture_decoder_inputs", spy_capture)
    monkeypatch.setattr(awq.AwqStep, "prepare", lambda self, device: events.append(f"prepare {device}"))
    model = make_model("llama")
    config = Config(global_quant_config=QuantizationConfig(weight=replace(UINT4_PER_GROUP_ASYM_SPEC, group_size=32)),
                    exclude=["lm_head"])
    awq.AwqProcessor(model, AWQConfig(), make_batches(2), quant_config=config).apply()
    assert events == ["prepare cpu", "capture"]


def test_gptq_warms_up_one_solve_per_grid_and_shape_class(monkeypatch: pytest.MonkeyPatch) -> None:
    from quark.torch.algorithm.gptq import gptq
    from quark.torch.quantization.config.config import GPTQConfig

    model = make_model("llama")
    config = Config(global_quant_config=QuantizationConfig(weight=replace(UINT4_PER_GROUP_ASYM_SPEC, group_size=32)),
                    exclude=["lm_head"])
    step = gptq.GptqProcessor(model, GPTQConfig(), make_batches(2), quant_config=config).build_step()
    monkeypatch.setattr(gptq, "kernels_apply", lambda t, grid: True)  # as on a GPU
    calls = gptq._warmup_calls(step._first_layer, step.grids[0], step._options("warm-up", True), torch.device("cpu"))
    # every linear of the tiny Llama has 2 or 4 groups of 32 and 32 to 128 rows: one class
    assert [c.args[0] for c in calls] == [(16, 17 * 32)]
    solved: list[tuple[int, ...]] = []
    monkeypatch.setattr(gptq, "gptq_quantize", lambda w, h, grid, **kw: solved.append((*w.shape, *h.shape)))
    KernelWarmup(calls, "cpu", "test").wait()
    assert solved == [(16, 544, 544, 544)]


GPU_CHECK = textwrap.dedent("""
    import json, sys
    from dataclasses import replace
    import torch, transformers, triton
    from quark.torch.algorithm.awq import awq
    from quark.torch.algorithm.gptq import gptq
    from quark.torch.algorithm.kernels import warmup
    from quark.torch.quantization.config.config import AWQConfig, Config, GPTQConfig, QuantizationConfig
    from quark.torch.quantization.config.custom_config import UINT4_PER_GROUP_ASYM_SPEC

    compiled, marks = [], []
    def hook(*args, **kwargs):
        compiled.append(str(kwargs.get("repr", ""))[:60])
    triton.knobs.runtime.jit_post_compile_hook = hook
    wait = warmup.KernelWarmup.wait
    def spy(self):
        wait(self)
        marks.append(len(compiled))
    warmup.KernelWarmup.wait = spy
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).cuda().eval()
    config = Config(global_quant_config=QuantizationConfig(weight=replace(UINT4_PER_GROUP_ASYM_SPEC, group_size=128)),
                    exclude=["lm_head"])
    batches = [torch.randint(0, 256, (1, 64), device="cuda") for _ in range(4)]
    if sys.argv[-1] == "gptq":
        gptq.GptqProcessor(model, GPTQConfig(clip_search_steps=10), batches, quant_config=config,
                           device="cuda").apply()
    else:
        awq.AwqProcessor(model, AWQConfig(), batches, quant_config=config, device="cuda").apply()
    print(json.dumps({"compiled": compiled, "marks": marks}))
""")



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("algorithm", ["awq", "gptq"])
def test_the_search_compiles_nothing_after_its_warm_up_on_the_gpu(tmp_path: Path, algorithm: str) -> None:
    triton = pytest.importorskip("triton")
    if not hasattr(getattr(triton, "knobs", None), "runtime"):
        pytest.skip("this Triton has no compile hooks")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", GPU_CHECK, algorithm], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    names = " ".join(report["compiled"])
    kernels = (("_candidate_weights_kernel", "_squared_error_kernel") if algorithm == "awq"
               else ("_block_kernel", "_range_search_kernel"))
    for kernel in kernels:
        assert kernel in names, report
    if algorithm == "awq":  # the scale candidates' kernel does the final clipping too
        assert "_clip_search_kernel" not in names, report
    assert len(report["marks"]) == 1 and report["marks"][0] == len(report["compiled"]), report


def test_a_warm_up_starts_only_on_a_gpu_with_something_to_compile() -> None:
    from quark.torch.algorithm.kernels import warmup

    asked: list[torch.device] = []
    assert kernels.start_warmup("cpu", "test", lambda device: asked.append(device) or [lambda: None]) is None
    assert asked == []  # not even asked for its calls off a GPU
    warmup.finished(None)  # nothing to wait for
