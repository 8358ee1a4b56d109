"""ModelQuantizer end to end on tiny random transformers models."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch.utils.data import DataLoader

from quark.torch import LLMTemplate, ModelQuantizer
from quark.torch.quantization.config.config import Config, QuantizationConfig, QuantizationSpec
from quark.torch.quantization.config.resolve import explain
from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
from tests.helpers.tiny_models import tiny_model, token_batches

FP8 = QuantizationSpec(dtype=Dtype.fp8_e4m3, qscheme=QSchemeType.per_tensor, is_dynamic=False)


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(b).logits for b in batches])


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_feature_description_seed_strategies():
    """The seed's three strategies, with a tiny Llama and random ids in place of opt-125m."""
    from quark.torch.quantization.config.custom_config import (
        DEFAULT_W_FP8_A_FP8_PER_TENSOR_CONFIG,
        DEFAULT_W_INT8_A_INT8_PER_TENSOR_DYNAMIC_CONFIG,
        DEFAULT_W_UINT4_PER_GROUP_CONFIG,
    )

    ids = torch.randint(0, 128, (1, 12))
    for preset in (DEFAULT_W_UINT4_PER_GROUP_CONFIG, DEFAULT_W_INT8_A_INT8_PER_TENSOR_DYNAMIC_CONFIG,
                   DEFAULT_W_FP8_A_FP8_PER_TENSOR_CONFIG):
        model = tiny_model("llama")
        quant_config = Config(global_quant_config=preset)
        if preset.weight.group_size:
            quant_config = replace(quant_config, global_quant_config=replace(
                preset, weight=replace(preset.weight, group_size=32)))
        calib_dataloader = DataLoader(ids)
        quantizer = ModelQuantizer(quant_config)
        quant_model = quantizer.quantize_model(model, calib_dataloader)
        assert quant_model is model
        assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
        assert torch.isfinite(quant_model(ids).logits).all()


def test_precedence_exclude_layer_type_global():
    model = tiny_model("llama")
    int8 = QuantizationSpec(dtype=Dtype.int8, qscheme=QSchemeType.per_tensor, symmetric=True)
    config = Config(
        global_quant_config=QuantizationConfig(weight=FP8),
        layer_type_quant_config={torch.nn.Linear: QuantizationConfig(weight=int8)},
        layer_quant_config={"*.mlp.down_proj": QuantizationConfig(output_tensors=FP8)},
        exclude=["lm_head", "model.layers.1.*"],
    )
    rows = {r.name: r for r in explain(model, config)}
    assert rows["lm_head"].config is None and rows["lm_head"].rule == "exclude:lm_head"
    assert rows["model.layers.1.mlp.up_proj"].config is None
    down = rows["model.layers.0.mlp.down_proj"]
    assert down.rule == "layer_quant_config:*.mlp.down_proj"
    assert down.config.output_tensors == FP8 and down.config.weight == int8  # field-wise fallback
    assert rows["model.layers.0.self_attn.q_proj"].rule == "layer_type_quant_config:Linear"


def test_group_size_that_does_not_divide_is_reported_before_any_change():
    model = tiny_model("llama")
    state = copy.deepcopy(model.state_dict())
    w4 = QuantizationSpec(dtype=Dtype.int4, qscheme=QSchemeType.per_group, ch_axis=1, group_size=48)
    with pytest.raises(ValueError) as info:
        ModelQuantizer(Config(global_quant_config=QuantizationConfig(weight=w4))).quantize_model(model, None)
    message = str(info.value)
    assert "model.layers.0.mlp.down_proj" in message and "dim 1 = 128" in message
    assert "group sizes that fit: [8, 16, 32, 64, 128]" in message
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


@pytest.mark.parametrize("bad", [[], iter([])])
def test_empty_or_exhausted_dataloader(bad):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="empty"):
        ModelQuantizer(Config(global_quant_config=QuantizationConfig(weight=FP8, input_tensors=FP8))
                       ).quantize_model(model, bad)


def test_nan_in_calibration_names_module_and_restores_model():
    model = tiny_model("llama")
    original = model.model.layers[0].mlp.down_proj
    def poison(module, args):
        return (args[0] * float("nan"),)
    original.register_forward_pre_hook(poison)
    config = Config(global_quant_config=QuantizationConfig(weight=FP8, input_tensors=FP8))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.input_quantizer.*NaN"):
        ModelQuantizer(config).quantize_model(model, token_batches(1))
    assert model.model.layers[0].mlp.down_proj is original
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


SCHEMES = ["int4_wo_32", "int4_wo_64", "uint4_wo_32", "int8", "fp8", "mxfp4", "mxfp6_e2m3",
           "mxfp6_e3m2", "mx6", "bfp16"]


def test_the_summary_times_each_stage_that_ran():
    batches = token_batches(2)
    quantizer = ModelQuantizer(LLMTemplate.get("llama").get_config(scheme="fp8"))
    quantizer.quantize_model(tiny_model("llama"), batches)
    stages = quantizer.summary.stage_seconds
    assert list(stages) == ["swap_linears", "calibrate", "finalize"]  # no algorithm ran
    assert all(s >= 0 for s in stages.values()) and sum(stages.values()) <= quantizer.summary.seconds
    quantizer = ModelQuantizer(LLMTemplate.get("llama").get_config(scheme="int4_wo_32", algorithm="gptq"))
    quantizer.quantize_model(tiny_model("llama"), batches)
    assert list(quantizer.summary.stage_seconds) == ["swap_linears", "algorithms", "finalize"]  # weights only


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_end_to_end(family, scheme):
    model = tiny_model(family)
    batches = token_batches(2)
    ref = logits(model, batches)
    model_type = model.config.model_type
    config = LLMTemplate.get(model_type).get_config(scheme=scheme)
    ModelQuantizer(config).quantize_model(model, batches)
    fake = logits(model, batches)
    assert torch.isfinite(fake).all()
    assert 0 < rel_err(fake, ref) < 0.5
    ModelQuantizer.freeze(model)
    frozen = logits(model, batches)
    torch.testing.assert_close(frozen, fake, rtol=1e-4, atol=1e-4)


def test_fp8_is_closer_to_float_than_int4():
    batches = token_batches(2)
    errs = {}
    for scheme in ("fp8", "int4_wo_32"):
        model = tiny_model("llama")
        ref = logits(model, batches)
        ModelQuantizer(LLMTemplate.get("llama").get_config(scheme=scheme)).quantize_model(model, batches)
        errs[scheme] = rel_err(logits(model, batches), ref)
    assert errs["fp8"] < 0.05
    assert errs["fp8"] < errs["int4_wo_32"]


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_fp8_kv_cache_quantizes_k_and_v_outputs(family):
    model = tiny_model(family)
    config = LLMTemplate.get(model.config.model_type).get_config(scheme="fp8", kv_cache_scheme="fp8")
    ModelQuantizer(config).quantize_model(model, token_batches(2))
    attn = model.model.decoder.layers[0].self_attn if family == "opt" else model.model.layers[0].self_attn
    for proj in (attn.k_proj, attn.v_proj):
        assert proj.output_quantizer is not None and proj.output_quantizer.spec.dtype == Dtype.fp8_e4m3
        assert proj.output_quantizer.scale is not None and proj.output_quantizer.scale.item() > 0
    assert attn.q_proj.output_quantizer is None


def test_seed_kv_cache_pattern_config():
    """configuring-quantization.rst example 3: fp8 W8A8 with *.k_proj/*.v_proj output specs."""
    from quark.torch.quantization.config.custom_config import DEFAULT_W_FP8_A_FP8_PER_TENSOR_CONFIG

    quant_config = Config(global_quant_config=DEFAULT_W_FP8_A_FP8_PER_TENSOR_CONFIG)
    kv = {p: QuantizationConfig(input_tensors=quant_config.global_quant_config.input_tensors,
                                weight=quant_config.global_quant_config.weight, output_tensors=FP8)
          for p in ("*.v_proj", "*.k_proj")}
    quant_config = replace(quant_config, layer_quant_config=kv)
    model = tiny_model("llama")
    ModelQuantizer(quant_config).quantize_model(model, token_batches(2))
    assert model.model.layers[1].self_attn.v_proj.output_quantizer.scale.item() > 0


def test_freeze_unquantized_model_is_an_error():
    with pytest.raises(ValueError, match="no quantized layers"):
        ModelQuantizer.freeze(tiny_model("llama"))


def test_accelerate_device_hooks_survive_the_swap():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_model("llama")
    down = model.model.layers[0].mlp.down_proj
    add_hook_to_module(down, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    config = LLMTemplate.get("llama").get_config(scheme="fp8")
    ModelQuantizer(config).quantize_model(model, token_batches(1))
    swapped = model.model.layers[0].mlp.down_proj
    assert isinstance(swapped, QuantLinear) and isinstance(swapped._hf_hook, AlignDevicesHook)
    assert torch.isfinite(model(token_batches(1)[0]).logits).all()


def test_dict_and_list_batches():
    ids = token_batches(2)
    dict_batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids]
    list_batches = [[b[0]] for b in ids]  # 1-D ids in a list: unsqueezed to [1, seq]
    for batches in (dict_batches, list_batches):
        model = tiny_model("llama")
        ModelQuantizer(LLMTemplate.get("llama").get_config(scheme="int8")).quantize_model(model, batches)
        assert model.model.layers[0].mlp.up_proj.input_quantizer.scale.item() > 0


def test_bad_batch_type_is_named():
    with pytest.raises(ValueError, match="batch 0 has type str"):
        ModelQuantizer(LLMTemplate.get("llama").get_config(scheme="int8")).quantize_model(
            tiny_model("llama"), ["not a batch"])
