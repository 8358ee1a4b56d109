"""DEFAULT_* presets and the typed spec helpers: contents, cross-checks and JSON round trips."""

from __future__ import annotations

import json
from typing import Any

import pytest

import quark.torch.quantization.config.config as config_module
import quark.torch.quantization.config.custom_config as cc
from quark.torch.quantization.config.config import (
    Bfloat16Spec,
    BFP16Spec,
    Config,
    DataTypeSpec,
    Float16Spec,
    FP4PerGroupSpec,
    FP8E4M3PerTensorSpec,
    Int4PerChannelSpec,
    Int4PerGroupSpec,
    Int8PerTensorSpec,
    MX6Spec,
    MXSpec,
    OCP_MXFP4Spec,
    OCP_MXINT8Spec,
    QuantizationConfig,
    QuantizationSpec,
    ScaleQuantSpec,
    Uint4PerGroupSpec,
    Uint8PerChannelSpec,
)
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType, ScaleType
from quark.torch.quantization.observer.observer import (
    PerGroupMinMaxObserver,
    PerTensorMinMaxObserver,
    PerTensorMSEObserver,
    PerTensorPercentileObserver,
)

LAYER_PRESETS = {
    n: v for n, v in vars(cc).items() if n.startswith("DEFAULT_") and isinstance(v, QuantizationConfig)
}
CONFIG_PRESETS = {n: v for n, v in vars(cc).items() if n.startswith("DEFAULT_") and isinstance(v, Config)}
SPEC_CONSTANTS = {n: v for n, v in vars(cc).items() if n.isupper() and isinstance(v, QuantizationSpec)}
HELPERS = sorted(
    (
        c
        for c in vars(config_module).values()
        if isinstance(c, type)
        and issubclass(c, DataTypeSpec)
        and c is not DataTypeSpec
        and not c.__name__.startswith("_")
    ),
    key=lambda c: c.__name__,
)

REQUIRED_PRESETS = [
    "DEFAULT_W_UINT4_PER_GROUP_CONFIG",
    "DEFAULT_W_INT4_PER_GROUP_SYM_CONFIG",
    "DEFAULT_W_INT4_PER_CHANNEL_CONFIG",
    "DEFAULT_W_INT8_A_INT8_PER_TENSOR_CONFIG",
    "DEFAULT_W_INT8_A_INT8_PER_TENSOR_DYNAMIC_CONFIG",
    "DEFAULT_W_FP8_A_FP8_PER_TENSOR_CONFIG",
    "DEFAULT_W_FP8_PER_TENSOR_CONFIG",
    "DEFAULT_FLOAT16_CONFIG",
    "DEFAULT_BFLOAT16_CONFIG",
    "DEFAULT_W_MX_FP8_CONFIG",
    "DEFAULT_W_MX_FP8_A_MX_FP8_CONFIG",
    "DEFAULT_W_MXFP4_A_MXFP4_CONFIG",
    "DEFAULT_W_BFP16_CONFIG",
    "DEFAULT_W_BFP16_A_BFP16_CONFIG",
    "DEFAULT_W_MX6_CONFIG",
    "DEFAULT_W_MX6_A_MX6_CONFIG",
]


def test_required_presets_exist() -> None:
    missing = [n for n in REQUIRED_PRESETS if n not in LAYER_PRESETS]
    assert not missing
    assert cc.LAYER_PRESETS == LAYER_PRESETS and cc.CONFIG_PRESETS == CONFIG_PRESETS


@pytest.mark.parametrize("name", sorted(LAYER_PRESETS))
def test_layer_preset_json_round_trip(name: str) -> None:
    preset = LAYER_PRESETS[name]
    text = json.dumps(preset.to_dict())
    assert QuantizationConfig.from_dict(json.loads(text)) == preset
    # usable as a model-wide config and round-trips there too
    cfg = Config(global_quant_config=preset, exclude=["lm_head"])
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("name", sorted(CONFIG_PRESETS))
def test_config_preset_json_round_trip(name: str) -> None:
    preset = CONFIG_PRESETS[name]
    assert Config.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset


@pytest.mark.parametrize("name", sorted(SPEC_CONSTANTS))
def test_spec_constant_round_trip(name: str) -> None:
    spec = SPEC_CONSTANTS[name]
    assert QuantizationSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_uint4_preset_matches_the_seed_spec() -> None:
    seed = QuantizationSpec(
        dtype=Dtype.uint4,
        observer_cls=PerGroupMinMaxObserver,
        symmetric=False,
        scale_type=ScaleType.float,
        round_method=RoundType.half_even,
        qscheme=QSchemeType.per_group,
        ch_axis=1,
        is_dynamic=False,
        group_size=128,
    )
    assert QuantizationConfig(weight=seed) == cc.DEFAULT_W_UINT4_PER_GROUP_CONFIG
    assert cc.DEFAULT_UINT4_PER_GROUP_ASYM_SPEC is cc.UINT4_PER_GROUP_ASYM_SPEC


def test_presets_agree_with_typed_helpers() -> None:
    # two independent spellings of the same spec must agree
    assert Int8PerTensorSpec().to_quantization_spec() == cc.INT8_PER_TENSOR_SPEC
    assert Int8PerTensorSpec(is_dynamic=True).to_quantization_spec() == cc.INT8_PER_TENSOR_DYNAMIC_SPEC
    assert Uint4PerGroupSpec(ch_axis=1, group_size=128).to_quantization_spec() == cc.UINT4_PER_GROUP_ASYM_SPEC
    assert Int4PerGroupSpec(ch_axis=1).to_quantization_spec() == cc.INT4_PER_GROUP_SYM_SPEC
    assert Int4PerChannelSpec(ch_axis=0).to_quantization_spec() == cc.INT4_PER_CHANNEL_SPEC
    assert FP8E4M3PerTensorSpec().to_quantization_spec() == cc.FP8_PER_TENSOR_SPEC
    assert Bfloat16Spec().to_quantization_spec() == cc.BFLOAT16_SPEC
    assert Float16Spec().to_quantization_spec() == cc.FLOAT16_SPEC
    assert MXSpec(mx_element_dtype="fp8_e4m3").to_quantization_spec() == cc.MX_FP8_SPEC
    assert MX6Spec().to_quantization_spec() == cc.MX6_SPEC
    assert BFP16Spec().to_quantization_spec() == cc.BFP16_SPEC
    assert OCP_MXFP4Spec().to_quantization_spec() == cc.MXFP4_DYNAMIC_SPEC
    assert OCP_MXFP4Spec(is_dynamic=False).to_quantization_spec() == cc.MXFP4_SPEC


def test_preset_contents() -> None:
    dyn = cc.DEFAULT_W_INT8_A_INT8_PER_TENSOR_DYNAMIC_CONFIG
    assert dyn.input_tensors.is_dynamic is True and dyn.weight.is_dynamic is False  # type: ignore[union-attr]
    assert cc.DEFAULT_W_FP8_PER_TENSOR_CONFIG.input_tensors is None
    kv = cc.DEFAULT_W_FP8_A_FP8_PER_TENSOR_KV_CACHE_FP8_CONFIG
    assert sorted(kv.kv_cache_quant_config) == ["*k_proj", "*v_proj"] == sorted(kv.layer_quant_config)
    assert kv.kv_cache_quant_config["*v_proj"].output_tensors == cc.FP8_PER_TENSOR_SPEC
    mxfp4 = cc.DEFAULT_W_MXFP4_A_MXFP4_CONFIG.weight
    assert isinstance(mxfp4, QuantizationSpec)
    assert (mxfp4.dtype, mxfp4.scale_format, mxfp4.group_size, mxfp4.mx_element) == (
        Dtype.fp4,
        "e8m0",
        32,
        Dtype.fp4,
    )


# ---------------------------------------------------------------------------- typed helpers
def test_every_documented_helper_exists() -> None:
    names = {c.__name__ for c in HELPERS}
    documented = {
        "Uint4PerTensorSpec",
        "Uint4PerChannelSpec",
        "Uint4PerGroupSpec",
        "Int4PerTensorSpec",
        "Int4PerChannelSpec",
        "Int4PerGroupSpec",
        "Uint8PerTensorSpec",
        "Uint8PerChannelSpec",
        "Uint8PerGroupSpec",
        "Int8PerTensorSpec",
        "Int8PerChannelSpec",
        "Int8PerGroupSpec",
        "FP8E4M3PerTensorSpec",
        "FP8E4M3PerChannelSpec",
        "FP8E4M3PerGroupSpec",
        "FP8E5M2PerTensorSpec",
        "FP8E5M2PerChannelSpec",
        "FP8E5M2PerGroupSpec",
        "Float16Spec",
        "Bfloat16Spec",
        "MXSpec",
        "MX6Spec",
        "MX9Spec",
        "BFP16Spec",
        "OCP_MXFP4Spec",
        "OCP_MXFP6E3M2Spec",
        "OCP_MXFP6E2M3Spec",
        "OCP_MXFP8E4M3Spec",
        "OCP_MXFP8E5M2Spec",
        "OCP_MXINT8Spec",
        "FP4PerGroupSpec",
        "Int2PerGroupSpec",
    }
    assert documented <= names


@pytest.mark.parametrize("helper", HELPERS, ids=lambda c: c.__name__)
def test_helper_default_spec_round_trips(helper: type) -> None:
    spec = helper().to_quantization_spec()
    assert isinstance(spec, QuantizationSpec)
    assert QuantizationSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert QuantizationConfig.from_dict(QuantizationConfig(weight=spec).to_dict()) == QuantizationConfig(
        weight=spec
    )


@pytest.mark.parametrize(
    ("method", "observer"),
    [
        ("min_max", PerTensorMinMaxObserver),
        ("percentile", PerTensorPercentileObserver),
        ("mse", PerTensorMSEObserver),
        ("MSE", PerTensorMSEObserver),
    ],
)
def test_observer_method(method: str, observer: type) -> None:
    assert Int8PerTensorSpec(observer_method=method).to_quantization_spec().observer_cls is observer


@pytest.mark.parametrize(
    ("factory", "pattern"),
    [
        (
            lambda: Int8PerTensorSpec(observer_method="histogram"),
            r"Int8PerTensorSpec.observer_method='histogram' is not one of: min_max, percentile, mse",
        ),
        (
            lambda: Uint8PerChannelSpec(observer_method="percentile"),
            r"Uint8PerChannelSpec.observer_method='percentile' is not one of: min_max",
        ),
        (lambda: Int8PerTensorSpec(scale_type="pow2"), r"scale_type='pow2' is not one of: float, pof2"),
        (
            lambda: Int8PerTensorSpec(round_method="up"),
            r"round_method='up' is not one of: half_even, round, floor",
        ),
        (lambda: Int8PerTensorSpec(is_dynamic=None), r"is_dynamic=None must be True or False"),
        (lambda: Int4PerGroupSpec(group_size=0), r"Int4PerGroupSpec.group_size=0 must be a positive int"),
        (lambda: Int4PerChannelSpec(ch_axis="0"), r"Int4PerChannelSpec.ch_axis='0' must be an int"),
        (lambda: MXSpec(mx_element_dtype="uint4"), r"MXSpec.mx_element_dtype=uint4 is not one of: fp8_e4m3"),
        (lambda: MX6Spec(block_size=-16), r"MX6Spec.block_size=-16 must be a positive int"),
        (
            lambda: FP8E4M3PerTensorSpec(symmetric=False).to_quantization_spec(),
            r"symmetric=False is not allowed for dtype fp8_e4m3",
        ),
    ],
)
def test_invalid_helper_options(factory: Any, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        factory()


def test_helper_options_map_to_spec_fields() -> None:
    spec = Uint4PerGroupSpec(
        scale_type="pof2", round_method="floor", ch_axis=0, group_size=32, is_dynamic=True
    ).to_quantization_spec()
    assert (
        spec.scale_type,
        spec.round_method,
        spec.ch_axis,
        spec.group_size,
        spec.is_dynamic,
        spec.symmetric,
    ) == (ScaleType.pof2, RoundType.floor, 0, 32, True, False)
    assert OCP_MXINT8Spec().to_quantization_spec().mx_element is Dtype.int8


def test_scale_quant_spec_two_stage() -> None:
    stages = ScaleQuantSpec(
        first_stage=FP4PerGroupSpec(group_size=16), second_stage=FP8E4M3PerTensorSpec()
    ).to_quantization_spec()
    assert [s.dtype for s in stages] == [Dtype.fp4, Dtype.fp8_e4m3]
    assert [s.is_scale_quant for s in stages] == [False, True]
    dynamic_input = ScaleQuantSpec(  # activations: per-group scales computed per input
        first_stage=FP4PerGroupSpec(group_size=16, is_dynamic=True), second_stage=FP8E4M3PerTensorSpec()
    ).to_quantization_spec()
    cfg = QuantizationConfig(weight=stages, input_tensors=dynamic_input)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["weight"][0]["group_size"] == 16 and d["weight"][1]["is_scale_quant"] is True
    assert QuantizationConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="ScaleQuantSpec stages"):
        ScaleQuantSpec(first_stage="fp4", second_stage=FP8E4M3PerTensorSpec()).to_quantization_spec()  # type: ignore[arg-type]
