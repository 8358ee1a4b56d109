"""Two-stage (fp4 e2m1 per group 16, group scales in fp8 e4m3 per tensor: nvfp4-like) hf_format export.

The checkpoint row of ``reference/quark-hf-format.md``: ``weight`` U8 [out, in/2]; ``weight_scale``
F8_E4M3 [out, in/16]; ``weight_scale_2`` F32 []; ``input_scale_2`` F32 []. transformers' quark
integration renames ``weight_scale`` -> ``weight_quantizer.scale`` only at name boundaries, so
``weight_scale_2`` must be module state under that very name.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from safetensors import safe_open

from quark.torch import ModelExporter, ModelImporter, ModelQuantizer
from quark.torch.export.hf_format import skeleton
from quark.torch.quantization.config.config import (
    Config,
    FP4PerGroupSpec,
    FP8E4M3PerTensorSpec,
    QuantizationConfig,
    ScaleQuantSpec,
)
from tests.export.helpers import INPUT, logits
from tests.helpers.tiny_models import tiny_model, token_batches

K = "model.layers.0.self_attn.k_proj."


def _two_stage(dynamic: bool) -> list:
    return ScaleQuantSpec(FP4PerGroupSpec(group_size=16, is_dynamic=dynamic),
                          FP8E4M3PerTensorSpec(is_dynamic=False)).to_quantization_spec()


@functools.cache
def _exported(tmp_root: str, activations: bool):
    model = tiny_model("llama")
    config = Config(global_quant_config=QuantizationConfig(
        weight=_two_stage(False), input_tensors=_two_stage(True) if activations else None), exclude=["lm_head"])
    ModelQuantizer(config).quantize_model(model, token_batches(2, 8))
    ModelQuantizer.freeze(model)
    out = f"{tmp_root}/two_stage_{activations}"
    ModelExporter(export_dir=out).export_safetensors_model(model, config)
    return model, out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("two_stage"))


@pytest.mark.parametrize("activations", [False, True])
def test_layout_matches_the_format_table(root, activations):
    model, out = _exported(root, activations)
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        header = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        scale_2 = f.get_tensor(K + "weight_scale_2")
    k_proj = model.model.layers[0].self_attn.k_proj  # in 64, out 32
    assert header[K + "weight"] == ("U8", [32, 32])
    assert header[K + "weight_scale"] == ("F8_E4M3", [32, 4])
    assert header[K + "weight_scale_2"] == ("F32", [])
    assert torch.equal(scale_2, k_proj.weight_quantizer.scale_quantizer.scale)
    if activations:
        assert header[K + "input_scale_2"] == ("F32", [])
        assert K + "input_scale" not in header  # the first stage of the activations is dynamic
    else:
        assert not any(k.startswith(K + "input") for k in header)
    assert not any("zero_point" in k for k in header)  # float formats carry no zero point


@pytest.mark.parametrize("activations", [False, True])
def test_transformers_and_importer_reload_identical_logits(root, activations):
    model, out = _exported(root, activations)
    ref = logits(model)
    skeleton._TEMPLATES.clear()  # as in a fresh process: skeletons are built under transformers' meta device
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    k_proj = loaded.model.layers[0].self_attn.k_proj
    assert type(k_proj).__name__ == "QuantLinear"
    assert k_proj.weight_scale_2.dtype == torch.float32
    assert torch.equal(logits(loaded), ref)
    assert torch.equal(logits(ModelImporter(out).load_model()), ref)
    assert torch.equal(logits(ModelImporter(out).import_model_info(tiny_model("llama", seed=3))), ref)
    # the second stage really acts: dropping it (scale_2 = 1) changes the model
    k_proj.weight_scale_2 = torch.ones(())
    assert not torch.equal(loaded(INPUT).logits, ref)


def test_second_stage_state_names():
    """QuantLinear keeps the second stage as `<role>_scale_2`; a bare FakeQuantize as `scale_2`."""
    from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
    from quark.torch.quantization.tensor_quantize import FakeQuantize

    fq = FakeQuantize(_two_stage(False))
    w = torch.randn(8, 32)
    fq.calibrate_from(w)
    assert {"scale", "scale_2"} <= set(fq.state_dict())
    assert not any("scale_quantizer" in k for k in fq.state_dict())
    assert fq.state_dict(keep_vars=True)["scale_2"] is fq.scale_quantizer.scale

    linear = torch.nn.Linear(32, 8)
    module = QuantLinear.from_float(linear, QuantizationConfig(weight=_two_stage(False),
                                                               input_tensors=_two_stage(True)))
    module(torch.randn(2, 32))
    keys = set(module.state_dict())
    assert {"weight_scale_2", "weight_quantizer.scale"} <= keys
    assert not any("scale_quantizer" in k for k in keys)
    before = module.weight_scale_2.clone()
    module.weight_quantizer.scale_quantizer.scale = before * 2  # the view writes the module's buffer
    assert torch.equal(module.weight_scale_2, before * 2)
    copy = QuantLinear.from_float(torch.nn.Linear(32, 8), QuantizationConfig(weight=_two_stage(False)))
    copy.load_state_dict({k: v for k, v in module.state_dict().items() if not k.startswith("input")}, strict=False)
    assert torch.equal(copy.weight_quantizer.scale_quantizer.scale, before * 2)


def test_transformers_renaming_lands_every_checkpoint_key_on_our_module_state():
    """Run transformers' own key renaming over our whole key table (``_2`` names are not renamed)."""
    from transformers.core_model_loading import WeightRenaming, rename_source_key
    from transformers.quantizers.quantizer_quark import CHECKPOINT_KEYS

    from quark.torch.export.keys import CHECKPOINT_TO_MODULE

    renamings = [WeightRenaming(source, target) for source, target in CHECKPOINT_KEYS.items()]
    assert "weight_scale_2" in CHECKPOINT_TO_MODULE and "input_scale_2" in CHECKPOINT_TO_MODULE
    for ckpt, module_suffix in CHECKPOINT_TO_MODULE.items():
        renamed, _ = rename_source_key(f"model.layers.0.mlp.up_proj.{ckpt}", renamings, [])
        assert renamed == f"model.layers.0.mlp.up_proj.{module_suffix}", ckpt
