"""The pipeline on a CUDA device agrees with the CPU reference (skipped without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from quark.torch import LLMTemplate, ModelQuantizer
from tests.helpers.tiny_models import tiny_model, token_batches
from tests.quantization.calibration.test_placement import CASES

pytestmark = pytest.mark.gpu


def _logits(model, batches, device):
    with torch.no_grad():
        return torch.cat([model(b.to(device)).logits.float().cpu() for b in batches])


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4_wo_32", "uint4_wo_64", "mxfp4", "mx6", "bfp16"])
def test_quantize_on_cuda_matches_cpu(scheme):
    batches = token_batches(2)
    cpu_model = tiny_model("llama")
    gpu_model = copy.deepcopy(cpu_model).cuda()
    config = LLMTemplate.get("llama").get_config(scheme=scheme, kv_cache_scheme="fp8" if scheme == "fp8" else None)
    ModelQuantizer(config).quantize_model(cpu_model, batches)
    ModelQuantizer(config).quantize_model(gpu_model, [b.cuda() for b in batches])
    cpu_out, gpu_out = _logits(cpu_model, batches, "cpu"), _logits(gpu_model, batches, "cuda")
    assert ((gpu_out - cpu_out).norm() / cpu_out.norm()).item() < 1e-2
    ModelQuantizer.freeze(gpu_model)
    torch.testing.assert_close(_logits(gpu_model, batches, "cuda"), gpu_out, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("algorithm", ["awq", "gptq", "smoothquant", "rotation"])
def test_algorithms_on_cuda(algorithm):
    batches = token_batches(4, seq=32)
    model = tiny_model("llama").cuda()
    ref = _logits(model, batches, "cuda")
    scheme = "int8" if algorithm == "smoothquant" else "int4_wo_32"
    config = LLMTemplate.get("llama").get_config(scheme=scheme, algorithm=algorithm)
    ModelQuantizer(config).quantize_model(model, [b.cuda() for b in batches])
    out = _logits(model, batches, "cuda")
    assert torch.isfinite(out).all() and ((out - ref).norm() / ref.norm()).item() < 0.5


def test_bf16_model_on_cuda():
    batches = token_batches(2)
    model = tiny_model("qwen2").to(torch.bfloat16).cuda()
    ModelQuantizer(LLMTemplate.get("qwen2").get_config(scheme="fp8", attention_scheme="fp8")).quantize_model(
        model, [b.cuda() for b in batches])
    out = _logits(model, batches, "cuda")
    ModelQuantizer.freeze(model)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(_logits(model, batches, "cuda"), out, rtol=2e-2, atol=2e-2)


def test_calibration_merges_batches_on_cuda_with_the_per_batch_scales(monkeypatch):
    from quark.torch.quantization.calibration import batching

    batches = [b.cuda() for b in token_batches(8, seq=32)]
    base = tiny_model("llama").cuda()
    config = LLMTemplate.get("llama").get_config(scheme="fp8", kv_cache_scheme="fp8")
    scales, forwards = [], []
    for merge_tokens in (0, batching.MERGE_TOKENS):
        monkeypatch.setattr(batching, "MERGE_TOKENS", merge_tokens)
        model = copy.deepcopy(base)
        count = [0]
        model.register_forward_pre_hook(lambda mod, args, c=count: c.__setitem__(0, c[0] + 1))
        ModelQuantizer(config).quantize_model(model, batches)
        forwards.append(count[0])
        scales.append({n: b for n, b in model.named_buffers() if n.endswith("quantizer.scale")})
    assert forwards == [8, 1 + 2 + 1]
    for name, scale in scales[0].items():
        torch.testing.assert_close(scales[1][name], scale, rtol=1e-5, atol=0, msg=name)


PLACEMENT_CASES = {**CASES, "fp8_lm_head": dict(scheme="fp8", exclude_layers=[])}


@pytest.mark.parametrize("case", list(PLACEMENT_CASES))
def test_model_in_cpu_memory_equals_model_on_gpu(case):
    """Decoder layers in CPU memory, one at a time on the GPU: the same frozen tensors as all-on-GPU,
    and nothing of the model left on the GPU afterwards."""
    batches = token_batches(6, seq=32)
    config = LLMTemplate.get("llama").get_config(**PLACEMENT_CASES[case])
    on_gpu = tiny_model("llama").cuda()
    quantizer = ModelQuantizer(config)
    quantizer.quantize_model(on_gpu, [b.cuda() for b in batches])
    quantizer.freeze(on_gpu)
    in_cpu = tiny_model("llama")
    quantizer = ModelQuantizer(config, compute_device="cuda")
    quantizer.quantize_model(in_cpu, batches)
    quantizer.freeze(in_cpu)
    assert all(t.device.type == "cpu" for t in (*in_cpu.parameters(), *in_cpu.buffers()))
    a, b = on_gpu.state_dict(), in_cpu.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].cpu(), b[key]
        if x.dtype.itemsize == 1:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), key
