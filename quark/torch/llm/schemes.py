"""The ``--quant_scheme`` names of the PTQ recipes and the ``Config`` they build (layer 10).

Recipe names (``w_fp8_a_fp8``, ``w_int4_per_group_sym``, ...) are defined here as
``QuantizationConfig`` builders taking the group size; every ``LLMTemplate`` scheme name
(``fp8``, ``int4_wo_128``, ``mxfp4`` ...) is accepted as well and passed through. Model-family
knowledge (kv layers, default exclusions, algorithm data) comes from the family's
``LLMTemplate``; a model without one gets a generic Llama-like template (logged).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from quark.torch.quantization.config.config import (
    BFP16Spec,
    Config,
    FP4PerGroupSpec,
    FP8E4M3PerTensorSpec,
    Int4PerChannelSpec,
    Int4PerGroupSpec,
    Int8PerTensorSpec,
    MX6Spec,
    OCP_MXFP8E4M3Spec,
    QuantizationConfig,
    QuantizationSpec,
    ScaleQuantSpec,
    Uint4PerGroupSpec,
)
from quark.torch.quantization.config.resolve import UNFIT_LAYER_MODES
from quark.torch.quantization.config.template import LLMTemplate, isolated_registry, parse_algorithm_names

logger = logging.getLogger(__name__)

DEFAULT_INT_GROUP_SIZE = 128
FP4_GROUP_SIZE = 16
MX_BLOCK_SIZE = 32
ALGORITHMS = ("awq", "gptq", "smoothquant", "autosmoothquant", "rotation", "quarot")
KV_CACHE_DTYPES = ("fp8",)
MOE_SECOND_STEP_SCHEMES = ("w_int4_per_channel_sym",)
# Names of the experts' Linears in every MoE layout we know (old per-expert Linears, Grok-1,
# DeepSeek-MoE, and the per-expert Linears of quark.torch.llm.moe.unfuse_experts).
EXPERT_LAYER_PATTERNS = ("*experts.*",)


def _fp8() -> QuantizationSpec:
    return FP8E4M3PerTensorSpec(observer_method="min_max", is_dynamic=False).to_quantization_spec()


def _fixed_block(name: str, group_size: int | None, block: int | None) -> int | None:
    if group_size is not None and block is not None and group_size != block:
        raise ValueError(f"--group_size={group_size} does not apply to --quant_scheme {name}: its block "
                         f"size is fixed at {block}; allowed: {block} or leave --group_size out")
    return block


def _int4_group(symmetric: bool) -> Callable[[str, int | None], QuantizationConfig]:
    def build(name: str, group_size: int | None) -> QuantizationConfig:
        helper = Int4PerGroupSpec if symmetric else Uint4PerGroupSpec
        spec = helper(symmetric=symmetric, ch_axis=-1, group_size=group_size or DEFAULT_INT_GROUP_SIZE,
                      is_dynamic=False, round_method="half_even")
        return QuantizationConfig(weight=spec.to_quantization_spec())
    return build


def _no_group(name: str, group_size: int | None) -> None:
    if group_size is not None:
        raise ValueError(f"--group_size does not apply to --quant_scheme {name} (not a per-group scheme); "
                         "leave --group_size out")


def _int4_per_channel(name: str, group_size: int | None) -> QuantizationConfig:
    _no_group(name, group_size)
    return QuantizationConfig(weight=int4_per_channel_spec())


def int4_per_channel_spec() -> QuantizationSpec:
    return Int4PerChannelSpec(symmetric=True, ch_axis=0, is_dynamic=False,
                              round_method="half_even").to_quantization_spec()


def _fp8_w_a(name: str, group_size: int | None) -> QuantizationConfig:
    _no_group(name, group_size)
    return QuantizationConfig(input_tensors=_fp8(), weight=_fp8())


def _int8_w_a(name: str, group_size: int | None) -> QuantizationConfig:
    _no_group(name, group_size)
    spec = Int8PerTensorSpec(observer_method="min_max", symmetric=True, is_dynamic=False,
                             round_method="half_even").to_quantization_spec()
    return QuantizationConfig(input_tensors=spec, weight=copy.deepcopy(spec))


def _block(helper: Callable[..., object], activations: bool, fixed: int | None = None,
           ) -> Callable[[str, int | None], QuantizationConfig]:
    """Block formats: static weights; activations (when quantized) per block, dynamically."""
    def build(name: str, group_size: int | None) -> QuantizationConfig:
        if fixed is not None:
            _fixed_block(name, group_size, fixed)
            weight = helper(is_dynamic=False).to_quantization_spec()  # type: ignore[attr-defined]
            act = helper(is_dynamic=True).to_quantization_spec() if activations else None  # type: ignore[attr-defined]
        else:
            weight = helper(is_dynamic=False, block_size=group_size).to_quantization_spec()  # type: ignore[attr-defined]
            act = (helper(is_dynamic=True, block_size=group_size).to_quantization_spec()  # type: ignore[attr-defined]
                   if activations else None)
        return QuantizationConfig(input_tensors=act, weight=weight)
    return build


def _fp4_scale_fp8(activations: bool) -> Callable[[str, int | None], QuantizationConfig]:
    """Two-stage: fp4 e2m1 per group (16 by default), the group scales in fp8 e4m3 per tensor."""
    def build(name: str, group_size: int | None) -> QuantizationConfig:
        group = group_size or FP4_GROUP_SIZE

        def two_stage(dynamic: bool) -> list[QuantizationSpec]:
            return ScaleQuantSpec(FP4PerGroupSpec(group_size=group, is_dynamic=dynamic),
                                  FP8E4M3PerTensorSpec(is_dynamic=False)).to_quantization_spec()
        return QuantizationConfig(input_tensors=two_stage(True) if activations else None,
                                  weight=two_stage(False))
    return build


RECIPE_SCHEMES: dict[str, Callable[[str, int | None], QuantizationConfig]] = {
    "w_fp8_a_fp8": _fp8_w_a,
    "w_int4_per_group_sym": _int4_group(True),
    "w_uint4_per_group_asym": _int4_group(False),
    "w_int8_a_int8_per_tensor_sym": _int8_w_a,
    "w_mxfp8": _block(OCP_MXFP8E4M3Spec, False, fixed=MX_BLOCK_SIZE),
    "w_mxfp8_a_mxfp8": _block(OCP_MXFP8E4M3Spec, True, fixed=MX_BLOCK_SIZE),
    "w_bfp16": _block(BFP16Spec, False),
    "w_bfp16_a_bfp16": _block(BFP16Spec, True),
    "w_mx6": _block(MX6Spec, False),
    "w_mx6_a_mx6": _block(MX6Spec, True),
    "w_fp4_scale_fp8": _fp4_scale_fp8(False),
    "w_fp4_a_fp4_scale_fp8": _fp4_scale_fp8(True),
    "w_int4_per_channel_sym": _int4_per_channel,
}


#: Where vision-language models keep what text-only calibration never runs (vision and audio towers,
#: their projectors into the language model).
MULTIMODAL_PARTS = ("*vision_tower*", "*vision_model*", "*visual.*", "*multi_modal_projector*", "*audio_tower*")


def text_only_excludes(hf_config: object) -> list[str]:
    """Patterns of layers that text-only calibration never runs; they stay in float: a vision-language
    model's towers and projectors, and Llama-3.2-Vision's cross-attention layers (image inputs only)."""
    patterns: list[str] = []
    if any(getattr(hf_config, key, None) is not None for key in ("vision_config", "audio_config")):
        patterns += MULTIMODAL_PARTS
    if getattr(hf_config, "model_type", None) == "mllama":
        text = getattr(hf_config, "text_config", None)
        patterns += [f"*language_model.layers.{i}.*" for i in getattr(text, "cross_attention_layers", None) or []]
    return patterns


def scheme_names() -> list[str]:
    """Every ``--quant_scheme`` value: the recipe names, then the LLMTemplate scheme names."""
    return [*RECIPE_SCHEMES, *(n for n in LLMTemplate.list_schemes() if n not in RECIPE_SCHEMES)]


def check_scheme(name: str, owner: str = "--quant_scheme") -> None:
    if name not in scheme_names():
        raise ValueError(f"{owner}={name!r} is not a known scheme; known: {', '.join(scheme_names())}")


def parse_algorithms(value: str | None) -> list[str]:
    """``"awq,gptq"`` -> ``["awq", "gptq"]`` in order, validated."""
    return parse_algorithm_names("--quant_algo", value or None, ALGORITHMS)


def template_for(model_type: str) -> LLMTemplate:
    """The registered template, or a generic Llama-like one (q/k/v names, ``lm_head`` excluded)."""
    if model_type in LLMTemplate.list_available():
        return LLMTemplate.get(model_type)
    logger.warning("no LLMTemplate for model_type %r (available: %s); using a generic template: "
                   "kv layers *k_proj/*v_proj, exclude lm_head, algorithms by discovery only",
                   model_type, ", ".join(LLMTemplate.list_available()))
    return LLMTemplate(model_type=model_type, kv_layer_name=["*k_proj", "*v_proj"], q_layer_name=["*q_proj"],
                       exclude_layers=["lm_head"])


@dataclass
class SchemeRequest:
    """What the command line asks for, before it becomes a ``Config``."""

    scheme: str
    group_size: int | None = None
    kv_cache_dtype: str | None = None
    algorithms: Sequence[str] = ()
    exclude_layers: Sequence[str] | None = None
    moe_second_step: str | None = None
    min_kv_scale: float = 0.0
    extra_exclude: Sequence[str] = ()
    kv_cache_post_rope: bool = False
    unfit_layers: str = "error"


def build_config(template: LLMTemplate, request: SchemeRequest) -> Config:
    """The ``Config`` for ``request`` on ``template``'s family.

    QuaRot is the rotation algorithm with online Hadamards; it is taken from the template's
    rotation data and turned into a ``QuaRotConfig``.
    """
    check_scheme(request.scheme)
    if request.group_size is not None and (isinstance(request.group_size, bool) or request.group_size < 1):
        raise ValueError(f"--group_size={request.group_size!r} must be a positive integer")
    if request.kv_cache_dtype is not None and request.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv_cache_dtype={request.kv_cache_dtype!r} is not one of: {', '.join(KV_CACHE_DTYPES)}")
    algorithms = list(request.algorithms)
    exclude = request.exclude_layers
    if request.extra_exclude:
        base = list(template.exclude_layers or []) if exclude is None else list(exclude)
        exclude = [*base, *(p for p in request.extra_exclude if p not in base)]
        logger.info("layers %s run only with image inputs and stay in float (text-only calibration)",
                    ", ".join(request.extra_exclude))
    template_algos = ["rotation" if a == "quarot" else a for a in algorithms]
    with isolated_registry():
        if request.scheme in RECIPE_SCHEMES:
            global_config = RECIPE_SCHEMES[request.scheme](request.scheme, request.group_size)
            LLMTemplate.register_scheme(request.scheme, global_config, overwrite=True)
        elif request.group_size is not None:
            raise ValueError(f"--group_size does not apply to the LLMTemplate scheme {request.scheme!r} "
                             "(its group size is part of its name); leave --group_size out")
        config = template.get_config(scheme=request.scheme, algorithm=template_algos or None,
                                     kv_cache_scheme=request.kv_cache_dtype, min_kv_scale=request.min_kv_scale,
                                     exclude_layers=exclude)
    if request.unfit_layers not in UNFIT_LAYER_MODES:
        raise ValueError(f"--unfit_layers={request.unfit_layers!r} is not one of: {', '.join(UNFIT_LAYER_MODES)}")
    config.unfit_layers = request.unfit_layers
    if request.kv_cache_post_rope:
        if request.kv_cache_dtype is None:
            raise ValueError("--kv_cache_post_rope needs --kv_cache_dtype (it says where the KV cache is quantized)")
        config.kv_cache_post_rope = True
    if "quarot" in algorithms:
        config.algo_config = [_as_quarot(a, config, request.kv_cache_dtype is not None)
                              if getattr(a, "name", "") == "rotation" else a for a in config.algo_config or []]
    if request.moe_second_step is not None:
        add_moe_second_step(config, request.moe_second_step)
    return config


def _as_quarot(rotation: object, config: Config, kv_cache: bool) -> object:
    from quark.torch.quantization.config.config import QuaRotConfig

    fields = {k: v for k, v in vars(rotation).items()
              if k in QuaRotConfig.__dataclass_fields__ and k != "name" and v is not None}
    return QuaRotConfig(**fields, kv_cache_quant=kv_cache,
                        act_quant=config.global_quant_config.input_tensors is not None)


def add_moe_second_step(config: Config, scheme: str) -> None:
    """Expert Linears get the second-step weight spec; their first step is done by
    :func:`quark.torch.llm.moe.prequantize_experts` (the experts' weights are rounded to the
    global weight spec, then quantized again with this spec). Inputs/outputs keep the global specs."""
    if scheme not in MOE_SECOND_STEP_SCHEMES:
        raise ValueError(f"--moe_experts_second_step_config={scheme!r} is not one of: "
                         f"{', '.join(MOE_SECOND_STEP_SCHEMES)}")
    base = config.global_quant_config
    for pattern in EXPERT_LAYER_PATTERNS:
        config.layer_quant_config[pattern] = QuantizationConfig(
            input_tensors=copy.deepcopy(base.input_tensors), output_tensors=copy.deepcopy(base.output_tensors),
            weight=int4_per_channel_spec())


__all__ = [
    "ALGORITHMS",
    "EXPERT_LAYER_PATTERNS",
    "KV_CACHE_DTYPES",
    "MOE_SECOND_STEP_SCHEMES",
    "RECIPE_SCHEMES",
    "SchemeRequest",
    "add_moe_second_step",
    "build_config",
    "check_scheme",
    "parse_algorithms",
    "scheme_names",
    "template_for",
    "text_only_excludes",
]
