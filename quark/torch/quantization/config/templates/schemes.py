"""The built-in schemes of ``LLMTemplate.get_config`` (the table of the LLMTemplate documentation).

Each entry builds a fresh ``QuantizationConfig``: weight-only int4/uint4 per-group, static
per-tensor int8 and fp8 W8A8, and block formats (OCP MXFP4/MXFP6, MX6, BFP16) with static
weights and dynamically quantized activations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from quark.torch.quantization.config.config import (
    BFP16Spec,
    FP8E4M3PerTensorSpec,
    Int4PerGroupSpec,
    Int8PerTensorSpec,
    MX6Spec,
    OCP_MXFP4Spec,
    OCP_MXFP6E2M3Spec,
    OCP_MXFP6E3M2Spec,
    QuantizationConfig,
    QuantizationSpec,
    Uint4PerGroupSpec,
)


def fp8_per_tensor() -> QuantizationSpec:
    return FP8E4M3PerTensorSpec(
        observer_method="min_max", scale_type="float", is_dynamic=False
    ).to_quantization_spec()


def fp8_output_per_tensor() -> QuantizationSpec:
    """The KV-cache / attention output spec: static fp8 per tensor, ``scale_type`` left unset
    (``null`` in checkpoints, as amd-quark 0.13 writes it; a float scale either way)."""
    spec = FP8E4M3PerTensorSpec(observer_method="min_max", is_dynamic=False).to_quantization_spec()
    spec.scale_type = None  # a recorded null (NULL_PRESERVING_KEYS): the observer reads it as float
    return spec


def _int4_wo(group_size: int) -> Callable[[], QuantizationConfig]:
    def build() -> QuantizationConfig:
        spec = Int4PerGroupSpec(
            symmetric=True,
            ch_axis=-1,
            group_size=group_size,
            is_dynamic=False,
            scale_type="float",
            round_method="half_even",
        )
        return QuantizationConfig(weight=spec.to_quantization_spec())

    return build


def _uint4_wo(group_size: int) -> Callable[[], QuantizationConfig]:
    def build() -> QuantizationConfig:
        spec = Uint4PerGroupSpec(
            symmetric=False,
            ch_axis=-1,
            group_size=group_size,
            is_dynamic=False,
            scale_type="float",
            round_method="half_even",
        )
        return QuantizationConfig(weight=spec.to_quantization_spec())

    return build


def _int8() -> QuantizationConfig:
    spec = Int8PerTensorSpec(
        observer_method="min_max",
        symmetric=True,
        scale_type="float",
        round_method="half_even",
        is_dynamic=False,
    ).to_quantization_spec()
    return QuantizationConfig(input_tensors=spec, weight=copy.deepcopy(spec))


def _fp8() -> QuantizationConfig:
    return QuantizationConfig(input_tensors=fp8_per_tensor(), weight=fp8_per_tensor())


def _block(helper: Callable[..., Any], **options: Any) -> Callable[[], QuantizationConfig]:
    """Block formats: static weights, activations quantized dynamically per block."""

    def build() -> QuantizationConfig:
        return QuantizationConfig(
            input_tensors=helper(is_dynamic=True, **options).to_quantization_spec(),
            weight=helper(is_dynamic=False, **options).to_quantization_spec(),
        )

    return build


BUILTIN_SCHEMES: dict[str, Callable[[], QuantizationConfig]] = {
    "int4_wo_128": _int4_wo(128),
    "int4_wo_64": _int4_wo(64),
    "int4_wo_32": _int4_wo(32),
    "uint4_wo_128": _uint4_wo(128),
    "uint4_wo_64": _uint4_wo(64),
    "uint4_wo_32": _uint4_wo(32),
    "int8": _int8,
    "fp8": _fp8,
    "mxfp4": _block(OCP_MXFP4Spec, ch_axis=-1),
    "mxfp6_e2m3": _block(OCP_MXFP6E2M3Spec, ch_axis=-1),
    "mxfp6_e3m2": _block(OCP_MXFP6E3M2Spec, ch_axis=-1),
    # MX6: shared exponent per 16 elements (Rouhani et al.'s k1, amd-quark 0.13's MX6Scheme default)
    "mx6": _block(MX6Spec, ch_axis=-1, block_size=16),
    "bfp16": _block(BFP16Spec, ch_axis=-1, block_size=8),
}
