"""Ready-made specs and layer configs (``DEFAULT_*``) of the Quark config API (layer 1).

Weight specs for ``nn.Linear`` (weight ``[out, in]``): per-channel along ``ch_axis=0`` (one scale
per output channel), per-group along the input dimension, ``ch_axis=1`` (== -1 for 2-D weights).

Presets are module constants shared by every importer: treat them as read-only and derive
variants with ``dataclasses.replace``.
"""

from __future__ import annotations

from quark.torch.quantization.config.config import (
    AWQConfig,
    Config,
    GPTQConfig,
    QuantizationConfig,
    QuantizationSpec,
    SmoothQuantConfig,
)
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType, ScaleType

# ---------------------------------------------------------------------------- tensor specs
FLOAT16_SPEC = QuantizationSpec(dtype=Dtype.float16, observer_cls="PlaceholderObserver")  # type: ignore[arg-type]
BFLOAT16_SPEC = QuantizationSpec(dtype=Dtype.bfloat16, observer_cls="PlaceholderObserver")  # type: ignore[arg-type]

FP8_PER_TENSOR_SPEC = QuantizationSpec(dtype=Dtype.fp8_e4m3, qscheme=QSchemeType.per_tensor,
                                       observer_cls="PerTensorMinMaxObserver", is_dynamic=False)  # type: ignore[arg-type]
FP8_PER_TENSOR_DYNAMIC_SPEC = QuantizationSpec(dtype=Dtype.fp8_e4m3, qscheme=QSchemeType.per_tensor,
                                               observer_cls="PerTensorMinMaxObserver", is_dynamic=True)  # type: ignore[arg-type]
FP8_PER_CHANNEL_SPEC = QuantizationSpec(dtype=Dtype.fp8_e4m3, qscheme=QSchemeType.per_channel, ch_axis=0,
                                        observer_cls="PerChannelMinMaxObserver", is_dynamic=False)  # type: ignore[arg-type]


def _int_spec(dtype: Dtype, qscheme: QSchemeType, *, symmetric: bool, is_dynamic: bool = False,
              ch_axis: int | None = None, group_size: int | None = None) -> QuantizationSpec:
    observer = {QSchemeType.per_tensor: "PerTensorMinMaxObserver",
                QSchemeType.per_channel: "PerChannelMinMaxObserver",
                QSchemeType.per_group: "PerGroupMinMaxObserver"}[qscheme]
    return QuantizationSpec(dtype=dtype, qscheme=qscheme, observer_cls=observer,  # type: ignore[arg-type]
                            symmetric=symmetric, scale_type=ScaleType.float,
                            round_method=RoundType.half_even, is_dynamic=is_dynamic,
                            ch_axis=ch_axis, group_size=group_size)


INT8_PER_TENSOR_SPEC = _int_spec(Dtype.int8, QSchemeType.per_tensor, symmetric=True)
INT8_PER_TENSOR_DYNAMIC_SPEC = _int_spec(Dtype.int8, QSchemeType.per_tensor, symmetric=True, is_dynamic=True)
INT8_PER_CHANNEL_SPEC = _int_spec(Dtype.int8, QSchemeType.per_channel, symmetric=True, ch_axis=0)
INT4_PER_TENSOR_SPEC = _int_spec(Dtype.int4, QSchemeType.per_tensor, symmetric=True)
INT4_PER_CHANNEL_SPEC = _int_spec(Dtype.int4, QSchemeType.per_channel, symmetric=True, ch_axis=0)
INT4_PER_GROUP_SYM_SPEC = _int_spec(Dtype.int4, QSchemeType.per_group, symmetric=True, ch_axis=1,
                                    group_size=128)
UINT4_PER_GROUP_ASYM_SPEC = _int_spec(Dtype.uint4, QSchemeType.per_group, symmetric=False, ch_axis=1,
                                      group_size=128)
# Spellings used by the Quark documentation and examples.
DEFAULT_UINT4_PER_GROUP_ASYM_SPEC = UINT4_PER_GROUP_ASYM_SPEC
INT8_PER_TENSER_SPEC = INT8_PER_TENSOR_SPEC
INT8_PER_TENSER_DYNAMIC_SPEC = INT8_PER_TENSOR_DYNAMIC_SPEC
INT4_PER_TENSER_SPEC = INT4_PER_TENSOR_SPEC

MX_FP8_SPEC = QuantizationSpec(dtype=Dtype.mx, mx_element_dtype=Dtype.fp8_e4m3, qscheme=QSchemeType.per_group,
                               ch_axis=-1, group_size=32, is_dynamic=False)
MXFP4_SPEC = QuantizationSpec(dtype=Dtype.fp4, observer_cls="PerBlockMXObserver",  # type: ignore[arg-type]
                              qscheme=QSchemeType.per_group, ch_axis=-1, group_size=32,
                              scale_format="e8m0", scale_calculation_mode="even", is_dynamic=False)
MXFP4_DYNAMIC_SPEC = QuantizationSpec(dtype=Dtype.fp4, observer_cls="PerBlockMXObserver",  # type: ignore[arg-type]
                                      qscheme=QSchemeType.per_group, ch_axis=-1, group_size=32,
                                      scale_format="e8m0", scale_calculation_mode="even", is_dynamic=True)
MX6_SPEC = QuantizationSpec(dtype=Dtype.mx6, ch_axis=-1, is_dynamic=False)
BFP16_SPEC = QuantizationSpec(dtype=Dtype.bfp16, ch_axis=-1, is_dynamic=False)

# ---------------------------------------------------------------------------- layer configs
DEFAULT_FLOAT16_CONFIG = QuantizationConfig(input_tensors=FLOAT16_SPEC, weight=FLOAT16_SPEC)
DEFAULT_BFLOAT16_CONFIG = QuantizationConfig(input_tensors=BFLOAT16_SPEC, weight=BFLOAT16_SPEC)

DEFAULT_W_FP8_PER_TENSOR_CONFIG = QuantizationConfig(weight=FP8_PER_TENSOR_SPEC)
DEFAULT_W_FP8_A_FP8_PER_TENSOR_CONFIG = QuantizationConfig(input_tensors=FP8_PER_TENSOR_SPEC,
                                                           weight=FP8_PER_TENSOR_SPEC)
DEFAULT_W_FP8_A_FP8_OFP8_PER_TENSOR_CONFIG = QuantizationConfig(input_tensors=FP8_PER_TENSOR_SPEC,
                                                                weight=FP8_PER_TENSOR_SPEC,
                                                                output_tensors=FP8_PER_TENSOR_SPEC)
DEFAULT_W_FP8_PER_CHANNEL_A_FP8_DYNAMIC_CONFIG = QuantizationConfig(input_tensors=FP8_PER_TENSOR_DYNAMIC_SPEC,
                                                                    weight=FP8_PER_CHANNEL_SPEC)

DEFAULT_W_INT4_PER_TENSOR_CONFIG = QuantizationConfig(weight=INT4_PER_TENSOR_SPEC)
DEFAULT_W_INT4_PER_CHANNEL_CONFIG = QuantizationConfig(weight=INT4_PER_CHANNEL_SPEC)
DEFAULT_W_INT4_PER_GROUP_SYM_CONFIG = QuantizationConfig(weight=INT4_PER_GROUP_SYM_SPEC)
DEFAULT_W_UINT4_PER_GROUP_CONFIG = QuantizationConfig(weight=UINT4_PER_GROUP_ASYM_SPEC)
DEFAULT_W_UINT4_A_BFLOAT16_PER_GROUP_CONFIG = QuantizationConfig(input_tensors=BFLOAT16_SPEC,
                                                                 weight=UINT4_PER_GROUP_ASYM_SPEC)
DEFAULT_W_INT8_PER_CHANNEL_CONFIG = QuantizationConfig(weight=INT8_PER_CHANNEL_SPEC)
DEFAULT_W_INT8_A_INT8_PER_TENSOR_CONFIG = QuantizationConfig(input_tensors=INT8_PER_TENSOR_SPEC,
                                                             weight=INT8_PER_TENSOR_SPEC)
DEFAULT_W_INT8_A_INT8_PER_TENSOR_DYNAMIC_CONFIG = QuantizationConfig(
    input_tensors=INT8_PER_TENSOR_DYNAMIC_SPEC, weight=INT8_PER_TENSOR_SPEC)

DEFAULT_W_MX_FP8_CONFIG = QuantizationConfig(weight=MX_FP8_SPEC)
DEFAULT_W_MX_FP8_A_MX_FP8_CONFIG = QuantizationConfig(input_tensors=MX_FP8_SPEC, weight=MX_FP8_SPEC)
DEFAULT_W_MXFP4_A_MXFP4_CONFIG = QuantizationConfig(input_tensors=MXFP4_DYNAMIC_SPEC, weight=MXFP4_SPEC)
DEFAULT_W_MX6_CONFIG = QuantizationConfig(weight=MX6_SPEC)
DEFAULT_W_MX6_A_MX6_CONFIG = QuantizationConfig(input_tensors=MX6_SPEC, weight=MX6_SPEC)
DEFAULT_W_BFP16_CONFIG = QuantizationConfig(weight=BFP16_SPEC)
DEFAULT_W_BFP16_A_BFP16_CONFIG = QuantizationConfig(input_tensors=BFP16_SPEC, weight=BFP16_SPEC)

# FP8 weights/activations with FP8 (static, per-tensor) K and V cache: the k/v projections get an
# fp8 output quantizer, in both layer_quant_config and kv_cache_quant_config (checkpoint layout).
_FP8_KV_LAYER_CONFIG = QuantizationConfig(input_tensors=FP8_PER_TENSOR_SPEC, weight=FP8_PER_TENSOR_SPEC,
                                          output_tensors=FP8_PER_TENSOR_SPEC)
FP8_KV_CACHE_LAYER_CONFIG: dict[str, QuantizationConfig] = {
    "*k_proj": _FP8_KV_LAYER_CONFIG,
    "*v_proj": _FP8_KV_LAYER_CONFIG,
}
DEFAULT_W_FP8_A_FP8_PER_TENSOR_KV_CACHE_FP8_CONFIG = Config(
    global_quant_config=DEFAULT_W_FP8_A_FP8_PER_TENSOR_CONFIG,
    layer_quant_config=dict(FP8_KV_CACHE_LAYER_CONFIG),
    kv_cache_quant_config=dict(FP8_KV_CACHE_LAYER_CONFIG),
    exclude=["lm_head"],
)

# ---------------------------------------------------------------------------- model-wide configs
DEFAULT_AWQ_CONFIG = Config(global_quant_config=DEFAULT_W_UINT4_PER_GROUP_CONFIG, algo_config=AWQConfig())
DEFAULT_GPTQ_CONFIG = Config(global_quant_config=DEFAULT_W_UINT4_PER_GROUP_CONFIG, algo_config=GPTQConfig())
DEFAULT_SMOOTH_QUANT_CONFIG = Config(global_quant_config=DEFAULT_W_INT8_A_INT8_PER_TENSOR_CONFIG,
                                     algo_config=SmoothQuantConfig(alpha=0.5))

LAYER_PRESETS: dict[str, QuantizationConfig] = {
    name: value for name, value in globals().items()
    if name.startswith("DEFAULT_") and isinstance(value, QuantizationConfig)
}
CONFIG_PRESETS: dict[str, Config] = {
    name: value for name, value in globals().items()
    if name.startswith("DEFAULT_") and isinstance(value, Config)
}
