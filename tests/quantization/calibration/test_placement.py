"""Placement: a model not wholly on the compute device is processed one decoder layer at a time.

On a CPU-only machine the model and the compute device are both the CPU, so these tests force the
layer-by-layer path (``api.on_device`` -> False) and compare it with the whole-model path: every
frozen weight, scale and zero point must be bit-identical (same arithmetic, same order). The real
CPU-memory-to-GPU placement runs the same code; ``tests/test_gpu.py`` checks it on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from quark.torch import LLMTemplate, ModelQuantizer
from quark.torch.quantization import api
from quark.torch.quantization.calibration import layer_forward
from quark.torch.quantization.calibration.batches import run_batches
from quark.torch.quantization.calibration.layer_forward import forward_layerwise
from quark.torch.quantization.calibration.placement import tensors_moved
from tests.helpers.tiny_models import tiny_model, token_batches

CASES = {
    "fp8_kv": dict(scheme="fp8", kv_cache_scheme="fp8"),
    "fp8_attention": dict(scheme="fp8", kv_cache_scheme="fp8", attention_scheme="fp8"),
    "int8_smoothquant": dict(scheme="int8", algorithm="smoothquant"),
    "int4_awq": dict(scheme="int4_wo_32", algorithm="awq"),
    "int4_gptq": dict(scheme="int4_wo_32", algorithm="gptq"),
    "int8_rotation": dict(scheme="int8", algorithm="rotation"),
    "uint4_wo": dict(scheme="uint4_wo_64"),
    "mxfp4": dict(scheme="mxfp4"),
}


def _quantize(family: str, case: dict, layerwise: bool, monkeypatch: pytest.MonkeyPatch, **config_kwargs):
    model = tiny_model(family)
    config = LLMTemplate.get(family).get_config(**case, **config_kwargs)
    with monkeypatch.context() as patch:
        if layerwise:
            patch.setattr(api, "on_device", lambda module, device: False)
        quantizer = ModelQuantizer(config)
        quantizer.quantize_model(model, token_batches(4))
        quantizer.freeze(model)
    return model


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key].view(torch.uint8) if sa[key].dtype.itemsize == 1 else sa[key],
                           sb[key].view(torch.uint8) if sb[key].dtype.itemsize == 1 else sb[key]), key


@pytest.mark.parametrize("case", list(CASES))
def test_layer_by_layer_equals_whole_model(case, monkeypatch):
    whole = _quantize("llama", CASES[case], False, monkeypatch)
    layered = _quantize("llama", CASES[case], True, monkeypatch)
    _assert_same_state(whole, layered)


@pytest.mark.parametrize("family", ["opt", "qwen2"])
def test_layer_by_layer_equals_whole_model_other_families(family, monkeypatch):
    case = dict(scheme="fp8", kv_cache_scheme="fp8")
    _assert_same_state(_quantize(family, case, False, monkeypatch), _quantize(family, case, True, monkeypatch))


def test_quantizers_after_the_decoder_layers_calibrate_too(monkeypatch):
    """With lm_head quantized (static input scale), the modules after the last layer run as well."""
    calls = []
    real = layer_forward.forward_layerwise

    def spy(*args, **kwargs):
        calls.append(kwargs.get("run_tail"))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "forward_layerwise", spy)
    case = dict(scheme="fp8", exclude_layers=[])
    whole = _quantize("llama", case, False, monkeypatch)
    layered = _quantize("llama", case, True, monkeypatch)
    assert calls == [True]
    assert layered.lm_head.input_quantizer.scale is not None
    _assert_same_state(whole, layered)


def test_forward_layerwise_gives_the_model_outputs():
    """The tail callback receives what ``model(batch)`` returns, batch by batch."""
    model = tiny_model("llama")
    batches = token_batches(3)
    with torch.no_grad():
        expected = [model(b, use_cache=False).logits for b in batches]
    got = {}
    forward_layerwise(model, batches, "cpu", tail=lambda i, out: got.__setitem__(i, out.logits))
    for i, logits in enumerate(expected):
        assert torch.equal(got[i], logits)
    assert not hasattr(model.model.layers[0], "forward") or "forward" not in model.model.layers[0].__dict__


def test_run_batches_and_forward_layerwise_observe_the_same(monkeypatch):
    model_a, model_b = tiny_model("llama"), tiny_model("llama")
    config = LLMTemplate.get("llama").get_config(scheme="fp8", kv_cache_scheme="fp8")
    # Insert quantizers without calibrating: the same pass is then run by both paths.
    from quark.torch.quantization.model_transformation import all_quantizers, plan_quantization, swap_linears

    for model in (model_a, model_b):
        swap_linears(model, plan_quantization(model, config)[0])
    batches = token_batches(4)
    run_batches(model_a, batches)
    forward_layerwise(model_b, batches, "cpu")
    for qa, qb in zip(all_quantizers(model_a), all_quantizers(model_b)):
        if qa.observer is not None and qa.observing:
            qa.finalize()
            qb.finalize()
            assert torch.equal(qa.scale, qb.scale), qa.name


@pytest.mark.gpu
def test_tied_weights_move_once_and_stay_tied():
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    with tensors_moved([model.lm_head, model.model.embed_tokens], "cuda"):
        assert model.lm_head.weight.device.type == "cuda"
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == "cpu"
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_compute_device_is_checked():
    config = LLMTemplate.get("llama").get_config(scheme="fp8")
    with pytest.raises(ValueError, match="compute_device"):
        ModelQuantizer(config, compute_device="tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            ModelQuantizer(config, compute_device="cuda")
