"""Spec JSON defaults as amd-quark 0.13 writes them, and exact round trips of recorded nulls."""

from __future__ import annotations

import json

import pytest

from quark.torch.quantization.config.config import Config, QuantizationConfig, QuantizationSpec
from quark.torch.quantization.config.spec import NULL_PRESERVING_KEYS
from quark.torch.quantization.config.type import Dtype, QSchemeType, ZeroPointType

# Independent reference: the weight spec dicts amd-quark 0.13 writes into config.json for
# LLMTemplate.get("llama").get_config(scheme=...) with scheme fp8, int8, uint4_wo_128 and mxfp4
# (measured by running amd-quark 0.13's QConfig.to_dict(); see reference/quark-hf-format.md).
_COMMON = {"ch_axis": None, "group_size": None, "block_size": None, "scale_format": None,
           "scale_calculation_mode": None, "mx_element_dtype": None, "is_scale_quant": False,
           "enable_buffer_reuse": False, "max_input_numel": 4194304, "round_method": "half_even",
           "scale_type": "float", "zero_point_type": "int32", "is_dynamic": False}
REFERENCE = {
    "fp8": {**_COMMON, "dtype": "fp8_e4m3", "qscheme": "per_tensor", "symmetric": True,
            "observer_cls": "PerTensorMinMaxObserver"},
    "int8": {**_COMMON, "dtype": "int8", "qscheme": "per_tensor", "symmetric": True,
             "observer_cls": "PerTensorMinMaxObserver"},
    "uint4_g128": {**_COMMON, "dtype": "uint4", "qscheme": "per_group", "ch_axis": -1, "group_size": 128,
                   "symmetric": False, "observer_cls": "PerGroupMinMaxObserver"},
    "mxfp4": {**_COMMON, "dtype": "fp4", "qscheme": "per_group", "ch_axis": -1, "group_size": 32,
              "symmetric": None, "scale_format": "e8m0", "scale_calculation_mode": "even",
              "observer_cls": "PerBlockMXObserver"},
}

# The same specs as a user writes them: without symmetric / zero_point_type / max_input_numel
# (uint4 names symmetric=False because it is asymmetric, not as a default).
USER_SPECS = {
    "fp8": lambda: QuantizationSpec(dtype=Dtype.fp8_e4m3, qscheme=QSchemeType.per_tensor, is_dynamic=False),
    "int8": lambda: QuantizationSpec(dtype=Dtype.int8, qscheme=QSchemeType.per_tensor, is_dynamic=False),
    "uint4_g128": lambda: QuantizationSpec(dtype=Dtype.uint4, qscheme=QSchemeType.per_group, ch_axis=-1,
                                           group_size=128, symmetric=False),
    "mxfp4": lambda: QuantizationSpec(dtype=Dtype.fp4, qscheme=QSchemeType.per_group, ch_axis=-1, group_size=32,
                                      scale_format="e8m0", scale_calculation_mode="even", is_dynamic=False),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_user_spec_json_equals_the_reference(name):
    ours = USER_SPECS[name]().to_dict()
    ref = REFERENCE[name]
    assert set(ours) == set(ref)
    for key, value in ref.items():
        assert ours[key] == value, f"{name}.{key}: ours {ours[key]!r}, reference {value!r}"


@pytest.mark.parametrize("name", list(REFERENCE))
def test_round_trip(name):
    spec = USER_SPECS[name]()
    again = QuantizationSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.to_dict() == spec.to_dict()
    assert QuantizationSpec.from_dict(REFERENCE[name]).to_dict() == REFERENCE[name]


@pytest.mark.parametrize("name", list(REFERENCE))
def test_recorded_nulls_stay_null(name):
    data = {**REFERENCE[name], **dict.fromkeys(NULL_PRESERVING_KEYS)}
    spec = QuantizationSpec.from_dict(data)
    assert spec.to_dict() == data
    assert spec.replace(is_dynamic=False).to_dict() == data  # a copy keeps them too
    assert spec.replace(symmetric=True).symmetric is True
    # missing keys (older or hand-written JSON) take the defaults (uint4's symmetric=False is no default)
    dropped = [k for k in NULL_PRESERVING_KEYS if not (k == "symmetric" and name == "uint4_g128")]
    missing = {k: v for k, v in REFERENCE[name].items() if k not in dropped}
    assert QuantizationSpec.from_dict(missing).to_dict() == REFERENCE[name]


def test_defaults_per_dtype_family():
    fp8 = QuantizationSpec(dtype=Dtype.fp8_e5m2, qscheme=QSchemeType.per_channel, ch_axis=0)
    nvfp4 = QuantizationSpec(dtype=Dtype.fp4, qscheme=QSchemeType.per_group, ch_axis=-1, group_size=16)
    mx = QuantizationSpec(dtype=Dtype.mx, mx_element_dtype=Dtype.fp8_e4m3)
    bf16 = QuantizationSpec(dtype=Dtype.bfloat16)
    assert fp8.symmetric is True
    assert nvfp4.symmetric is None and mx.symmetric is None and bf16.symmetric is None  # as the reference
    for spec in (fp8, nvfp4, mx, bf16):
        assert spec.zero_point_type == ZeroPointType.int32 and spec.max_input_numel == 4194304


def test_config_with_recorded_nulls_round_trips_exactly():
    layer = QuantizationConfig(weight=USER_SPECS["fp8"](), input_tensors=USER_SPECS["fp8"]())
    data = Config(global_quant_config=layer, exclude=["lm_head"]).to_dict()
    data["global_quant_config"]["weight"].update(dict.fromkeys(NULL_PRESERVING_KEYS))
    assert Config.from_dict(data).to_dict() == data
    assert Config.from_dict(data).global_quant_config.input_tensors.symmetric is True
