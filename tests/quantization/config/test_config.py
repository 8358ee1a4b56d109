"""QuantizationSpec / QuantizationConfig / Config / algorithm configs: validation and JSON layout."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from quark.torch.quantization.config.config import (
    SPEC_KEYS,
    AlgoConfigBase,
    AutoSmoothQuantConfig,
    AWQConfig,
    Config,
    GPTQConfig,
    PreQuantOptConfig,
    QConfig,
    QLayerConfig,
    QTensorConfig,
    QuantizationConfig,
    QuantizationSpec,
    QuaRotConfig,
    RotationConfig,
    SmoothQuantConfig,
    algo_config_from_dict,
    load_pre_optimization_config_from_file,
    load_quant_algo_config_from_file,
)
from quark.torch.quantization.config.type import (
    DeviceType,
    Dtype,
    QSchemeType,
    QuantizationMode,
    RoundType,
    ScaleType,
    ZeroPointType,
)
from quark.torch.quantization.observer.observer import (
    PerBlockMXObserver,
    PerChannelMinMaxObserver,
    PerGroupMinMaxObserver,
    PerTensorMinMaxObserver,
    PlaceholderObserver,
)


def uint4_g128(**kw: Any) -> QuantizationSpec:
    args: dict[str, Any] = dict(
        dtype=Dtype.uint4, qscheme=QSchemeType.per_group, ch_axis=-1, group_size=128, symmetric=False
    )
    args.update(kw)
    return QuantizationSpec(**args)


# ---------------------------------------------------------------------------- spec defaults
def test_aliases_are_the_same_classes() -> None:
    assert QConfig is Config and QLayerConfig is QuantizationConfig and QTensorConfig is QuantizationSpec


def test_string_inputs_become_enums_and_observer_classes() -> None:
    spec = QuantizationSpec(
        dtype="int8",
        qscheme="per_channel",
        ch_axis=0,
        observer_cls="PerChannelMinMaxObserver",
        round_method="round",
        scale_type="pof2",
        zero_point_type="int32",
    )
    assert spec.dtype is Dtype.int8 and spec.qscheme is QSchemeType.per_channel
    assert spec.observer_cls is PerChannelMinMaxObserver
    assert spec.round_method is RoundType.round and spec.scale_type is ScaleType.pof2


@pytest.mark.parametrize(
    ("kwargs", "observer"),
    [
        (dict(dtype=Dtype.bfloat16), PlaceholderObserver),
        (dict(dtype=Dtype.float16), PlaceholderObserver),
        (dict(dtype=Dtype.int8, qscheme=QSchemeType.per_tensor), PerTensorMinMaxObserver),
        (dict(dtype=Dtype.fp8_e4m3, qscheme=QSchemeType.per_tensor), PerTensorMinMaxObserver),
        (dict(dtype=Dtype.int8, qscheme=QSchemeType.per_channel, ch_axis=0), PerChannelMinMaxObserver),
        (
            dict(dtype=Dtype.uint4, qscheme=QSchemeType.per_group, ch_axis=1, group_size=32),
            PerGroupMinMaxObserver,
        ),
        (dict(dtype=Dtype.mx, mx_element_dtype=Dtype.fp4), PerBlockMXObserver),
        (dict(dtype=Dtype.bfp16), PerBlockMXObserver),
        (
            dict(
                dtype=Dtype.fp4, qscheme=QSchemeType.per_group, ch_axis=-1, group_size=32, scale_format="e8m0"
            ),
            PerBlockMXObserver,
        ),
    ],
)
def test_default_observer(kwargs: dict[str, Any], observer: type) -> None:
    assert QuantizationSpec(**kwargs).observer_cls is observer


def test_integer_defaults() -> None:
    spec = QuantizationSpec(dtype=Dtype.int4, qscheme=QSchemeType.per_tensor)
    assert (spec.symmetric, spec.round_method, spec.scale_type, spec.zero_point_type, spec.is_dynamic) == (
        True,
        RoundType.half_even,
        ScaleType.float,
        ZeroPointType.int32,
        False,
    )


def test_float_and_cast_defaults() -> None:
    # as amd-quark 0.13 records them (tests/quantization/config/test_reference_defaults.py)
    fp8 = QuantizationSpec(dtype=Dtype.fp8_e4m3, qscheme=QSchemeType.per_tensor)
    assert fp8.symmetric is True and fp8.zero_point_type == ZeroPointType.int32 and fp8.is_dynamic is False
    bf16 = QuantizationSpec(dtype=Dtype.bfloat16)
    assert (bf16.is_dynamic, bf16.round_method, bf16.scale_type, bf16.qscheme) == (None, None, None, None)


@pytest.mark.parametrize(("dtype", "block"), [(Dtype.mx6, 16), (Dtype.mx9, 16), (Dtype.bfp16, 8)])
def test_block_formats_take_group_size_from_format_table(dtype: Dtype, block: int) -> None:
    spec = QuantizationSpec(dtype=dtype)
    assert (spec.qscheme, spec.group_size, spec.ch_axis) == (QSchemeType.per_group, block, -1)


def test_mx_defaults_and_element_property() -> None:
    spec = QuantizationSpec(dtype=Dtype.mx, mx_element_dtype="fp6_e2m3")
    assert (spec.qscheme, spec.group_size, spec.ch_axis) == (QSchemeType.per_group, 32, -1)
    assert spec.mx_element is Dtype.fp6_e2m3
    ocp = QuantizationSpec(
        dtype=Dtype.fp4, qscheme="per_group", ch_axis=-1, group_size=32, scale_format="e8m0"
    )
    assert ocp.mx_element is Dtype.fp4
    assert QuantizationSpec(dtype=Dtype.fp8_e4m3, qscheme="per_tensor").mx_element is None


def test_block_size_is_a_synonym_of_group_size() -> None:
    spec = QuantizationSpec(dtype=Dtype.int4, qscheme=QSchemeType.per_group, ch_axis=1, block_size=64)
    assert spec.group_size == 64 and spec.block_size == 64
    assert QuantizationSpec.from_dict(spec.to_dict()) == spec


def test_replace_revalidates() -> None:
    spec = uint4_g128()
    assert replace(spec, group_size=32).group_size == 32
    with pytest.raises(ValueError, match="group_size"):
        replace(spec, group_size=0)


# ---------------------------------------------------------------------------- spec validation
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        # per_group without a positive group_size
        (dict(dtype="uint4", qscheme="per_group", ch_axis=1), r"group_size=None.*per_group.*positive"),
        (dict(dtype="uint4", qscheme="per_group", ch_axis=1, group_size=0), r"group_size=0.*positive"),
        (dict(dtype="uint4", qscheme="per_group", ch_axis=1, group_size=-128), r"group_size=-128.*positive"),
        # per_channel / per_group without ch_axis, ch_axis not an int
        (dict(dtype="int8", qscheme="per_channel"), r"ch_axis=None.*per_channel"),
        (dict(dtype="int4", qscheme="per_group", group_size=32), r"ch_axis=None.*per_group"),
        (dict(dtype="int8", qscheme="per_channel", ch_axis="0"), r"ch_axis='0' must be an int"),
        (dict(dtype="int8", qscheme="per_channel", ch_axis=1.0), r"ch_axis=1.0 must be an int"),
        (dict(dtype="int8", qscheme="per_channel", ch_axis=True), r"ch_axis=True must be an int"),
        # asymmetric float / MX / BFP formats
        (
            dict(dtype="fp8_e4m3", qscheme="per_tensor", symmetric=False),
            r"symmetric=False.*fp8_e4m3.*allowed: True, None",
        ),
        (dict(dtype="fp8_e5m2", qscheme="per_tensor", symmetric=False), r"symmetric=False.*fp8_e5m2"),
        (
            dict(dtype="fp4", qscheme="per_group", ch_axis=-1, group_size=16, symmetric=False),
            r"symmetric=False.*fp4.*allowed: True, None",
        ),
        (dict(dtype="mx", mx_element_dtype="fp8_e4m3", symmetric=False), r"symmetric=False.*dtype mx"),
        (dict(dtype="bfp16", symmetric=False), r"symmetric=False.*bfp16"),
        (dict(dtype="mx6", symmetric=False), r"symmetric=False.*mx6"),
        # MX element dtype
        (
            dict(dtype="mx"),
            r"mx_element_dtype=None.*allowed: fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4, int8",
        ),
        (dict(dtype="mx", mx_element_dtype="uint4"), r"mx_element_dtype=.*uint4.*allowed: fp8_e4m3"),
        (dict(dtype="mx", mx_element_dtype="int3"), r"mx_element_dtype='int3' is not one of"),
        (
            dict(dtype="int8", qscheme="per_tensor", mx_element_dtype="fp4"),
            r"mx_element_dtype=fp4.*allowed: None",
        ),
        (
            dict(dtype="mx", mx_element_dtype="fp4", qscheme="per_tensor"),
            r"qscheme=per_tensor.*allowed: per_group",
        ),
        # observer that does not support the granularity or the format kind
        (
            dict(dtype="int8", qscheme="per_channel", ch_axis=0, observer_cls="PerTensorMinMaxObserver"),
            r"observer_cls=PerTensorMinMaxObserver does not support qscheme=per_channel"
            r".*allows qscheme: per_tensor",
        ),
        (
            dict(
                dtype="int8",
                qscheme="per_tensor",
                observer_cls="PerTensorPercentileObserver",
                ch_axis=None,
                group_size=8,
            ),
            r"group_size=8 is only meaningful with qscheme per_group",
        ),
        (
            dict(dtype="mx", mx_element_dtype="fp4", observer_cls="PerGroupMinMaxObserver"),
            r"PerGroupMinMaxObserver does not support dtype mx.*allows kinds: int, float",
        ),
        (
            dict(
                dtype="int8", qscheme="per_group", ch_axis=1, group_size=32, observer_cls="PerBlockMXObserver"
            ),
            r"PerBlockMXObserver does not support dtype int8.*allows kinds: mx, bfp",
        ),
        (
            dict(dtype="bfloat16", observer_cls="PerTensorMinMaxObserver"),
            r"PerTensorMinMaxObserver does not support dtype bfloat16.*allows kinds",
        ),
        (
            dict(dtype="fp8_e4m3", qscheme="per_tensor", observer_cls="PlaceholderObserver"),
            r"PlaceholderObserver does not support dtype fp8_e4m3.*allows kinds: cast",
        ),
        (
            dict(dtype="int8", qscheme="per_tensor", observer_cls="MinMaxObserver"),
            r"observer_cls='MinMaxObserver' is not a known observer; allowed: PlaceholderObserver",
        ),
        (
            dict(dtype="int8", qscheme="per_tensor", observer_cls=nn.Linear),
            r"not a registered observer class; allowed: PlaceholderObserver",
        ),
        # scale type meaningless for a plain cast
        (dict(dtype="bfloat16", scale_type="pof2"), r"scale_type=pof2.*bfloat16.*allowed: None"),
        # enums and strings
        (dict(dtype="int3"), r"dtype='int3' is not one of: int8, uint8"),
        (dict(dtype=None), r"dtype is required; allowed: int8"),
        (
            dict(dtype="int8", qscheme="per_row"),
            r"qscheme='per_row' is not one of: per_tensor, per_channel, per_group",
        ),
        (
            dict(dtype="int8", qscheme="per_tensor", round_method="ceil"),
            r"round_method='ceil' is not one of: round",
        ),
        (
            dict(dtype="int8", qscheme="per_tensor", scale_type="pow2"),
            r"scale_type='pow2' is not one of: float, pof2",
        ),
        (dict(dtype="int8"), r"qscheme=None is not allowed for dtype int8; allowed: per_tensor"),
        (
            dict(dtype="fp4", qscheme="per_group", ch_axis=-1, group_size=32, scale_format="e5m2"),
            r"scale_format='e5m2' is not one of: e8m0",
        ),
        (
            dict(dtype="mx", mx_element_dtype="fp4", scale_calculation_mode="up"),
            r"scale_calculation_mode='up' is not one of: even, floor, ceil",
        ),
        (dict(dtype="int8", qscheme="per_tensor", scale_format="e8m0"), r"scale_format='e8m0' needs a float"),
        (dict(dtype="int8", qscheme="per_tensor", is_dynamic="yes"), r"is_dynamic='yes' must be True, False"),
        (
            dict(dtype="int8", qscheme="per_tensor", is_scale_quant=None),
            r"is_scale_quant=None must be True or False",
        ),
        (
            dict(dtype="int8", qscheme="per_group", ch_axis=1, group_size=32, block_size=64),
            r"block_size=64 and group_size=32 disagree",
        ),
        (
            dict(dtype="int8", qscheme="per_tensor", max_input_numel=0),
            r"max_input_numel=0 must be a positive int",
        ),
    ],
)
def test_invalid_spec(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        QuantizationSpec(**kwargs)


def test_spec_from_dict_rejects_unknown_keys_listing_known_ones() -> None:
    data = uint4_g128().to_dict()
    data["groupsize"] = 128
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['groupsize'\]; known keys: dtype, is_dynamic"):
        QuantizationSpec.from_dict(data)
    with pytest.raises(ValueError, match="expects a dict"):
        QuantizationSpec.from_dict([1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- spec JSON
def test_spec_dict_has_every_checkpoint_key_with_enums_by_name() -> None:
    d = uint4_g128(ch_axis=-1).to_dict()
    assert tuple(d) == SPEC_KEYS
    assert set(SPEC_KEYS) == {
        "dtype",
        "is_dynamic",
        "qscheme",
        "ch_axis",
        "group_size",
        "block_size",
        "symmetric",
        "round_method",
        "scale_type",
        "zero_point_type",
        "scale_format",
        "scale_calculation_mode",
        "mx_element_dtype",
        "observer_cls",
        "is_scale_quant",
        "enable_buffer_reuse",
        "max_input_numel",
    }
    # the reference's uint4 g128 weight example
    expected = {
        "dtype": "uint4",
        "qscheme": "per_group",
        "ch_axis": -1,
        "group_size": 128,
        "symmetric": False,
        "is_dynamic": False,
        "observer_cls": "PerGroupMinMaxObserver",
        "round_method": "half_even",
        "scale_type": "float",
        "zero_point_type": "int32",
    }
    assert {k: d[k] for k in expected} == expected
    assert json.loads(json.dumps(d)) == d


# ---------------------------------------------------------------------------- QuantizationConfig
def test_layer_config_accepts_two_stage_lists_and_round_trips() -> None:
    fp4 = QuantizationSpec(dtype=Dtype.fp4, qscheme="per_group", ch_axis=-1, group_size=16)
    fp8 = QuantizationSpec(dtype=Dtype.fp8_e4m3, qscheme="per_tensor", is_scale_quant=True)
    fp4_dynamic = fp4.replace(is_dynamic=True)  # a static per-group activation scale is refused
    cfg = QuantizationConfig(weight=[fp4, fp8], input_tensors=[fp4_dynamic, fp8], target_device="cpu")
    assert cfg.target_device is DeviceType.CPU
    d = cfg.to_dict()
    assert (
        isinstance(d["weight"], list) and len(d["weight"]) == 2 and d["weight"][1]["is_scale_quant"] is True
    )
    assert d["target_device"] == "cpu"
    assert QuantizationConfig.from_dict(json.loads(json.dumps(d))) == cfg


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(weight={"dtype": "int8"}), r"QuantizationConfig.weight=.*use QuantizationSpec.from_dict"),
        (
            dict(input_tensors="int8"),
            r"QuantizationConfig.input_tensors='int8' must be None, a QuantizationSpec",
        ),
        (dict(bias=3), r"QuantizationConfig.bias=3 must be None"),
        (
            dict(output_tensors=[QuantizationSpec(dtype="bfloat16")]),
            r"output_tensors: a list must hold exactly two",
        ),
        (dict(weight=[QuantizationSpec(dtype="bfloat16"), "x"]), r"weight: a list must hold exactly two"),
        (dict(target_device="tpu"), r"target_device='tpu' is not one of: CPU, GPU, IPU, NPU"),
    ],
)
def test_invalid_layer_config(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        QuantizationConfig(**kwargs)


def test_layer_config_rejects_helper_objects_with_a_hint() -> None:
    from quark.torch.quantization.config.config import Int8PerTensorSpec

    with pytest.raises(ValueError, match=r"to_quantization_spec"):
        QuantizationConfig(weight=Int8PerTensorSpec())  # type: ignore[arg-type]


def test_layer_config_from_dict_unknown_key() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['weights'\]; known keys: input_tensors"):
        QuantizationConfig.from_dict({"weights": None})


# ---------------------------------------------------------------------------- Config
def _global() -> QuantizationConfig:
    return QuantizationConfig(weight=uint4_g128())


def test_config_defaults_are_independent_objects() -> None:
    a, b = Config(global_quant_config=_global()), Config(global_quant_config=_global())
    a.exclude.append("lm_head")
    a.layer_quant_config["x"] = _global()
    assert b.exclude == [] and b.layer_quant_config == {}
    assert a.quant_mode is QuantizationMode.eager_mode and a.log_severity_level == 1
    assert (a.kv_cache_post_rope, a.min_kv_scale, a.softmax_quant_spec, a.algo_config) == (
        False,
        0.0,
        None,
        None,
    )


def test_config_algo_config_is_stored_as_list_and_mutators_validate() -> None:
    cfg = Config(global_quant_config=_global(), algo_config=AWQConfig())
    assert cfg.algo_config == [AWQConfig()]
    cfg.set_algo_config([GPTQConfig(), SmoothQuantConfig()])
    assert [type(a) for a in cfg.algo_config] == [GPTQConfig, SmoothQuantConfig]  # type: ignore[union-attr]
    cfg.set_algo_config(None)
    assert cfg.algo_config is None
    with pytest.raises(ValueError, match=r"algo_config entry .* allowed: SmoothQuantConfig"):
        cfg.set_algo_config("awq")  # type: ignore[arg-type]
    cfg.add_pre_optimization_config(RotationConfig())
    cfg.add_pre_optimization_config(SmoothQuantConfig(alpha=0.5))
    assert [type(p) for p in cfg.pre_quant_opt_config] == [RotationConfig, SmoothQuantConfig]
    with pytest.raises(ValueError, match=r"pre_quant_opt_config entry .* not one of: SmoothQuantConfig"):
        cfg.add_pre_optimization_config(AWQConfig())  # type: ignore[arg-type]


def test_config_replace_revalidates() -> None:
    cfg = Config(global_quant_config=_global())
    assert replace(cfg, exclude=["lm_head", "*.gate"]).exclude == ["lm_head", "*.gate"]
    with pytest.raises(ValueError, match=r"Config.exclude=.*list of fnmatch pattern strings"):
        replace(cfg, exclude=[1])
    with pytest.raises(ValueError, match=r"Config.exclude=.*list of fnmatch"):
        replace(cfg, exclude="lm_head")


def test_layer_type_keys_accept_module_classes_and_names() -> None:
    cfg = Config(
        global_quant_config=_global(), layer_type_quant_config={nn.Linear: _global(), "MyBlock": _global()}
    )
    d = cfg.to_dict()
    assert sorted(d["layer_type_quant_config"]) == ["Linear", "MyBlock"]
    back = Config.from_dict(d)
    assert set(back.layer_type_quant_config) == {nn.Linear, "MyBlock"}
    assert back == cfg


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(global_quant_config={"weight": None}), r"global_quant_config=.*must be a QuantizationConfig"),
        (
            dict(layer_quant_config={"*.q_proj": uint4_g128()}),
            r"layer_quant_config\['\*.q_proj'\]=.*QuantizationConfig",
        ),
        (dict(layer_quant_config={nn.Linear: _global()}), r"layer_quant_config key .* must be a str pattern"),
        (
            dict(layer_type_quant_config={3: _global()}),
            r"key 3 must be an nn.Module subclass or a class-name string",
        ),
        (dict(layer_type_quant_config={int: _global()}), r"must be an nn.Module subclass"),
        (dict(kv_cache_quant_config=[]), r"kv_cache_quant_config=\[\] must be a dict"),
        (dict(quant_mode="graph"), r"quant_mode='graph' is not one of: eager_mode, fx_graph_mode"),
        (dict(log_severity_level=7), r"log_severity_level=7 is not one of: 0, 1, 2, 3, 4, None"),
        (dict(softmax_quant_spec=_global()), r"softmax_quant_spec=.*None or a QuantizationSpec"),
        (dict(kv_cache_post_rope="no"), r"kv_cache_post_rope='no' must be True or False"),
        (dict(min_kv_scale=-1.0), r"Config.min_kv_scale=-1.0 must be in \[0, "),
        (dict(algo_config=[AWQConfig(), {"name": "gptq"}]), r"algo_config entry \{'name': 'gptq'\}"),
    ],
)
def test_invalid_config(kwargs: dict[str, Any], pattern: str) -> None:
    kwargs.setdefault("global_quant_config", _global())
    with pytest.raises(ValueError, match=pattern):
        Config(**kwargs)


def test_config_from_dict_rejects_unknown_keys_but_skips_exporter_keys() -> None:
    d = Config(global_quant_config=_global()).to_dict()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['excludes'\]; known keys: global_quant_config"):
        Config.from_dict({**d, "excludes": []})
    wrapped = {**d, "quant_method": "quark", "version": "0.13", "export": {"min_kv_scale": 0.5}}
    back = Config.from_dict(wrapped)
    assert back.min_kv_scale == 0.5
    with pytest.raises(ValueError, match="'global_quant_config' is required"):
        Config.from_dict({"exclude": []})


def test_optional_config_fields_round_trip() -> None:
    cfg = Config(
        global_quant_config=_global(),
        log_severity_level=3,
        min_kv_scale=1.0,
        pre_quant_opt_config=[QuaRotConfig(random=True)],
        quant_mode="fx_graph_mode",
        softmax_quant_spec=QuantizationSpec(dtype="fp8_e4m3", qscheme="per_tensor"),
        kv_cache_post_rope=True,
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["log_severity_level"] == 3 and d["min_kv_scale"] == 1.0 and d["quant_mode"] == "fx_graph_mode"
    assert d["pre_quant_opt_config"][0]["name"] == "quarot"
    assert Config.from_dict(d) == cfg
    plain = Config(global_quant_config=_global()).to_dict()
    assert not {"log_severity_level", "min_kv_scale", "pre_quant_opt_config"} & set(plain)


# ---------------------------------------------------------------------------- reference layouts
def _spec(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {k: None for k in SPEC_KEYS}
    base.update(is_scale_quant=False, enable_buffer_reuse=False)
    base.update(kw)
    return base


FP8_SPEC_DICT = _spec(
    dtype="fp8_e4m3",
    is_dynamic=False,
    qscheme="per_tensor",
    round_method="half_even",
    scale_type="float",
    zero_point_type="int32",
    observer_cls="PerTensorMinMaxObserver",
)
UINT4_SPEC_DICT = _spec(
    dtype="uint4",
    is_dynamic=False,
    qscheme="per_group",
    ch_axis=-1,
    group_size=128,
    symmetric=False,
    round_method="half_even",
    scale_type="float",
    zero_point_type="int32",
    observer_cls="PerGroupMinMaxObserver",
)
AWQ_DICT = {
    "name": "awq",
    "model_decoder_layers": "model.layers",
    "embedding_layers": None,
    "scaling_layers": [
        {
            "prev_op": "input_layernorm",
            "layers": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            "inp": "self_attn.q_proj",
            "module2inspect": "self_attn",
        },
        {"prev_op": "self_attn.v_proj", "layers": ["self_attn.o_proj"], "inp": "self_attn.o_proj"},
    ],
}


def _checkpoint(global_cfg: dict[str, Any], **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "quant_method": "quark",
        "version": "0.13",
        "quant_mode": "eager_mode",
        "global_quant_config": global_cfg,
        "layer_quant_config": {},
        "layer_type_quant_config": {},
        "kv_cache_quant_config": {},
        "exclude": ["lm_head"],
        "algo_config": None,
        "kv_cache_post_rope": False,
        "softmax_quant_spec": None,
        "export": {
            "kv_cache_group": [],
            "min_kv_scale": 0.0,
            "pack_method": "reorder",
            "weight_format": "real_quantized",
            "weight_merge_groups": None,
        },
    }
    d.update(kw)
    return d


def _layer(**kw: Any) -> dict[str, Any]:
    return {
        "input_tensors": None,
        "output_tensors": None,
        "weight": None,
        "bias": None,
        "target_device": None,
        **kw,
    }


KV = _layer(input_tensors=FP8_SPEC_DICT, weight=FP8_SPEC_DICT, output_tensors=FP8_SPEC_DICT)
REFERENCE_CHECKPOINTS = {
    "uint4_g128_awq": _checkpoint(_layer(weight=UINT4_SPEC_DICT), algo_config=[AWQ_DICT]),
    "fp8_kv_cache": _checkpoint(
        _layer(input_tensors=FP8_SPEC_DICT, weight=FP8_SPEC_DICT),
        layer_quant_config={"*k_proj": KV, "*v_proj": KV},
        kv_cache_quant_config={"*k_proj": KV, "*v_proj": KV},
        export={
            "kv_cache_group": ["*k_proj", "*v_proj"],
            "min_kv_scale": 0.0,
            "pack_method": "reorder",
            "weight_format": "real_quantized",
            "weight_merge_groups": None,
        },
    ),
    "mxfp4": _checkpoint(
        _layer(
            input_tensors=_spec(
                dtype="fp4",
                is_dynamic=True,
                qscheme="per_group",
                ch_axis=-1,
                group_size=32,
                round_method="half_even",
                scale_type="float",
                scale_format="e8m0",
                scale_calculation_mode="even",
                observer_cls="PerBlockMXObserver",
                max_input_numel=4194304,
            ),
            weight=_spec(
                dtype="fp4",
                is_dynamic=False,
                qscheme="per_group",
                ch_axis=-1,
                group_size=32,
                round_method="half_even",
                scale_type="float",
                scale_format="e8m0",
                scale_calculation_mode="even",
                observer_cls="PerBlockMXObserver",
                max_input_numel=4194304,
            ),
        )
    ),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_CHECKPOINTS))
def test_reference_checkpoint_layout_loads_and_reserialises_identically(name: str) -> None:
    original = REFERENCE_CHECKPOINTS[name]
    cfg = Config.from_dict(copy.deepcopy(original))
    out = cfg.to_dict()
    wrapper = {k: original[k] for k in ("quant_method", "version", "export")}
    assert {**out, **wrapper} == original
    assert json.dumps({**out, **wrapper}, sort_keys=True) == json.dumps(original, sort_keys=True)


def test_reference_checkpoint_content() -> None:
    cfg = Config.from_dict(copy.deepcopy(REFERENCE_CHECKPOINTS["fp8_kv_cache"]))
    kv = cfg.kv_cache_quant_config["*k_proj"].output_tensors
    assert isinstance(kv, QuantizationSpec) and kv.dtype is Dtype.fp8_e4m3 and kv.is_dynamic is False
    awq = Config.from_dict(copy.deepcopy(REFERENCE_CHECKPOINTS["uint4_g128_awq"])).algo_config
    assert (
        isinstance(awq, list)
        and isinstance(awq[0], AWQConfig)
        and awq[0].model_decoder_layers == "model.layers"
    )


# ---------------------------------------------------------------------------- algorithm configs
SCALING = [{"prev_op": "input_layernorm", "layers": ["self_attn.q_proj"], "inp": "self_attn.q_proj"}]
ALGO_CONFIGS: list[AlgoConfigBase] = [
    SmoothQuantConfig(),
    SmoothQuantConfig(
        name="smooth",
        alpha=0.5,
        scaling_layers=SCALING,
        model_decoder_layers="model.layers",
        embedding_layers=["e"],
    ),
    AutoSmoothQuantConfig(compute_scale_loss="MAE", scaling_layers=SCALING),
    AWQConfig(),
    AWQConfig(scaling_layers=SCALING, model_decoder_layers="model.layers"),
    GPTQConfig(),
    GPTQConfig(damp_percent=0.1, desc_act=False, inside_layer_modules=["mlp.up_proj"]),
    RotationConfig(random=True, scaling_layers=SCALING),
    QuaRotConfig(),
    QuaRotConfig(had=False, random2=True),
]


@pytest.mark.parametrize("cfg", ALGO_CONFIGS, ids=lambda c: type(c).__name__)
def test_algo_config_round_trip(cfg: AlgoConfigBase, tmp_path: Path) -> None:
    d = json.loads(json.dumps(cfg.to_dict()))
    assert algo_config_from_dict(d) == cfg
    path = tmp_path / "algo.json"
    path.write_text(json.dumps(d))
    assert load_quant_algo_config_from_file(path) == cfg
    if isinstance(cfg, PreQuantOptConfig):
        assert load_pre_optimization_config_from_file(str(path)) == cfg


def test_documented_algo_defaults() -> None:
    sq = SmoothQuantConfig()
    assert (sq.name, sq.alpha, sq.scale_clamp_min, sq.scaling_layers) == ("smoothquant", 1, 1e-3, None)
    g = GPTQConfig()
    assert (g.name, g.damp_percent, g.desc_act, g.static_groups, g.true_sequential) == (
        "gptq",
        0.01,
        True,
        True,
        True,
    )
    assert AutoSmoothQuantConfig().compute_scale_loss == "MSE" and AWQConfig().name == "awq"
    q = QuaRotConfig()
    assert (q.name, q.random, q.random2, q.had, q.optimized_rotation_path) == (
        "quarot",
        False,
        False,
        True,
        None,
    )
    assert RotationConfig().name == "rotation"
    assert isinstance(sq, PreQuantOptConfig) and not isinstance(AWQConfig(), PreQuantOptConfig)


def test_smooth_name_from_checkpoint_is_smoothquant() -> None:
    cfg = algo_config_from_dict({"name": "smooth", "alpha": 0.5})
    assert isinstance(cfg, SmoothQuantConfig) and cfg.alpha == 0.5


@pytest.mark.parametrize(
    ("factory", "pattern"),
    [
        (lambda: SmoothQuantConfig(alpha=1.5), r"SmoothQuantConfig.alpha=1.5 must be in \[0, 1\]"),
        (lambda: SmoothQuantConfig(alpha=-0.1), r"alpha=-0.1 must be in \[0, 1\]"),
        (lambda: SmoothQuantConfig(alpha="0.5"), r"alpha='0.5' must be a number"),
        (lambda: SmoothQuantConfig(scale_clamp_min=0), r"scale_clamp_min=0 must be > 0"),
        (lambda: SmoothQuantConfig(name="sq"), r"name='sq' is not one of: smoothquant, smooth"),
        (lambda: GPTQConfig(damp_percent=0), r"GPTQConfig.damp_percent=0 must be > 0"),
        (lambda: GPTQConfig(damp_percent=-0.01), r"damp_percent=-0.01 must be > 0"),
        (lambda: GPTQConfig(desc_act="yes"), r"GPTQConfig.desc_act='yes' must be True or False"),
        (lambda: GPTQConfig(inside_layer_modules="mlp"), r"inside_layer_modules='mlp' must be a list of str"),
        (
            lambda: AutoSmoothQuantConfig(compute_scale_loss="L1"),
            r"compute_scale_loss='L1' is not one of: MSE, MAE",
        ),
        (
            lambda: AWQConfig(scaling_layers=["input_layernorm"]),
            r"scaling_layers\[0\]='input_layernorm' must be a dict",
        ),
        (
            lambda: AWQConfig(scaling_layers=[{"layers": ["a"]}]),
            r"scaling_layers\[0\].prev_op=None is required",
        ),
        (
            lambda: AWQConfig(scaling_layers=[{"prev_op": "n"}]),
            r"scaling_layers\[0\].layers=None is required",
        ),
        (lambda: AWQConfig(scaling_layers=[{"prev_op": "n", "layers": []}]), r"non-empty list of str"),
        (
            lambda: AWQConfig(scaling_layers=[{"prev_op": "n", "layers": ["a"], "inputs": "a"}]),
            r"unknown key\(s\) \['inputs'\]; allowed: prev_op, layers, inp, module2inspect, has_kwargs",
        ),
        (
            lambda: AWQConfig(scaling_layers=[{"prev_op": "n", "layers": ["a"], "has_kwargs": "y"}]),
            r"has_kwargs='y' must be True or False",
        ),
        (lambda: AWQConfig(scaling_layers={"prev_op": "n"}), r"scaling_layers=.*must be a list of dicts"),
        (lambda: AWQConfig(model_decoder_layers=3), r"AWQConfig.model_decoder_layers=3 must be a str"),
        (lambda: QuaRotConfig(had=1), r"QuaRotConfig.had=1 must be True or False"),
        (lambda: QuaRotConfig(v_proj=None), r"QuaRotConfig.v_proj=None must be a str"),
        (lambda: RotationConfig(random=None), r"RotationConfig.random=None must be True or False"),
    ],
)
def test_invalid_algo_config(factory: Any, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        factory()


def test_compute_scale_loss_is_case_insensitive() -> None:
    assert AutoSmoothQuantConfig(compute_scale_loss="mae").compute_scale_loss == "MAE"


def test_algo_from_dict_errors() -> None:
    with pytest.raises(
        ValueError, match=r"name='quip' is not one of: smoothquant, smooth, autosmoothquant, awq"
    ):
        algo_config_from_dict({"name": "quip"})
    with pytest.raises(ValueError, match=r"name=None is not one of"):
        algo_config_from_dict({"alpha": 0.5})
    with pytest.raises(ValueError, match=r"GPTQConfig: unknown key\(s\) \['blocksize'\]; known keys: name"):
        algo_config_from_dict({"name": "gptq", "blocksize": 128})


def test_algo_loaders_read_json_only(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("AWQConfig(name='awq')")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_quant_algo_config_from_file(bad)
    arr = tmp_path / "arr.json"
    arr.write_text("[]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_quant_algo_config_from_file(arr)
    awq = tmp_path / "awq.json"
    awq.write_text(json.dumps({"name": "awq"}))
    with pytest.raises(
        ValueError, match=r"name='awq' is not a pre-quantization optimization; allowed: smoothquant"
    ):
        load_pre_optimization_config_from_file(awq)
