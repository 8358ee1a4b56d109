# ruff: noqa: E501
# (seed code blocks are copied verbatim, long lines included; trailing spaces dropped)
"""The code blocks of the seed documents run unchanged against the package.

Each block is kept verbatim below and executed in a shared namespace, in document order
(configuring-quantization.rst steps 1-4, llm-template.rst section 4's spec construction). When
the seed files are available, a test also checks that the copies are verbatim.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

from quark.torch.quantization.config.config import (
    AWQConfig,
    Config,
    GPTQConfig,
    QuantizationConfig,
    QuantizationSpec,
    SmoothQuantConfig,
)
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType, ScaleType

SEEDS = Path("/work/shared/seeds")

STEP1 = """\
from quark.torch.quantization.config.config import QuantizationSpec
from quark.torch.quantization.config.type import Dtype, QSchemeType, ScaleType, RoundType
from quark.torch.quantization.observer.observer import PlaceholderObserver, PerTensorMinMaxObserver, PerGroupMinMaxObserver

BFLOAT16_SPEC = QuantizationSpec(dtype=Dtype.bfloat16, observer_cls=PlaceholderObserver)

FP8_PER_TENSOR_SPEC = QuantizationSpec(dtype=Dtype.fp8_e4m3,
                                       qscheme=QSchemeType.per_tensor,
                                       observer_cls=PerTensorMinMaxObserver,
                                       is_dynamic=False)

INT8_PER_TENSER_SPEC = QuantizationSpec(dtype=Dtype.int8,
                                        qscheme=QSchemeType.per_tensor,
                                        observer_cls=PerTensorMinMaxObserver,
                                        symmetric=True,
                                        scale_type=ScaleType.float,
                                        round_method=RoundType.half_even,
                                        is_dynamic=False)

UINT4_PER_GROUP_ASYM_SPEC = QuantizationSpec(dtype=Dtype.uint4,
                                             observer_cls=PerGroupMinMaxObserver,
                                             symmetric=False,
                                             scale_type=ScaleType.float,
                                             round_method=RoundType.half_even,
                                             qscheme=QSchemeType.per_group,
                                             ch_axis=1,
                                             is_dynamic=False,
                                             group_size=128)
"""

STEP2 = """\

from quark.torch.quantization.config.config import QuantizationConfig

W_FP8_A_FP8_PER_TENSOR_CONFIG = QuantizationConfig(input_tensors=FP8_PER_TENSOR_SPEC,
                                                   weight=FP8_PER_TENSOR_SPEC)

W_INT8_A_INT8_PER_TENSOR_CONFIG = QuantizationConfig(input_tensors=INT8_PER_TENSER_SPEC,
                                                     weight=INT8_PER_TENSER_SPEC)

W_UINT4_PER_GROUP_CONFIG = QuantizationConfig(weight=UINT4_PER_GROUP_ASYM_SPEC)
"""

STEP3_PROCESSOR_IMPORTS = """\

from quark.torch.algorithm.awq.awq import AwqProcessor
from quark.torch.algorithm.awq.smooth import SmoothQuantProcessor
from quark.torch.algorithm.gptq.gptq import GptqProcessor
"""

STEP3_CONFIGS = """\
from quark.torch.quantization.config.config import AWQConfig, SmoothQuantConfig, GPTQConfig

ALGORITHM_CONFIG=AWQConfig(
  scaling_layers=[
    {'prev_op': 'input_layernorm', 'layers': ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'], 'inp': 'self_attn.q_proj', 'module2inspect': 'self_attn', 'has_kwargs': True, 'help': 'attention input'},
    {'prev_op': 'self_attn.v_proj', 'layers': ['self_attn.o_proj'], 'inp': 'self_attn.o_proj', 'module2inspect': None, 'has_kwargs': False, 'condition': 'module.self_attn.v_proj.weight.shape == module.self_attn.o_proj.weight.shape'},
    {'prev_op': 'post_attention_layernorm', 'layers': ['mlp.gate_proj', 'mlp.up_proj'], 'inp': 'mlp.gate_proj', 'module2inspect': 'mlp', 'has_kwargs': False, 'help': 'linear 1'},
    {'prev_op': 'mlp.up_proj', 'layers': ['mlp.down_proj'], 'inp': 'mlp.down_proj', 'module2inspect': None, 'has_kwargs': False, 'help': 'linear 2'}],
  model_decoder_layers='model.layers',
  embedding_layers=['model.embed_tokens'])

ALGORITHM_CONFIG=SmoothQuantConfig(
  alpha=0.5,
  scale_clamp_min=0.001,
  scaling_layers=[
    {'prev_op': 'input_layernorm', 'layers': ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'], 'inp': 'self_attn.q_proj', 'module2inspect': 'self_attn', 'has_kwargs': True, 'help': 'attention input'},
    {'prev_op': 'self_attn.v_proj', 'layers': ['self_attn.o_proj'], 'inp': 'self_attn.o_proj', 'module2inspect': None, 'has_kwargs': False, 'condition': 'module.self_attn.v_proj.weight.shape == module.self_attn.o_proj.weight.shape'},
    {'prev_op': 'post_attention_layernorm', 'layers': ['mlp.gate_proj', 'mlp.up_proj'], 'inp': 'mlp.gate_proj', 'module2inspect': 'mlp', 'has_kwargs': False, 'help': 'linear 1'},
    {'prev_op': 'mlp.up_proj', 'layers': ['mlp.down_proj'], 'inp': 'mlp.down_proj', 'module2inspect': None, 'has_kwargs': False, 'help': 'linear 2'}],
  embedding_layers=['model.embed_tokens'],
  model_decoder_layers='model.layers')


ALGORITHM_CONFIG=GPTQConfig(
  damp_percent=0.01,
  desc_act=True,
  static_groups=True,
  true_sequential=True,
  inside_layer_modules=['self_attn.k_proj', 'self_attn.v_proj', 'self_attn.q_proj', 'self_attn.o_proj', 'mlp.up_proj', 'mlp.gate_proj', 'mlp.down_proj'],
  model_decoder_layers='model.layers',
  embedding_layers=['model.embed_tokens'])
"""

# The seed's step 4 uses ``Config`` and ``replace`` without importing them.
STEP4_PREAMBLE = """\
from dataclasses import replace
from quark.torch.quantization.config.config import Config
"""

STEP4 = """\
# Example 1: W_INT8_A_INT8_PER_TENSOR
quant_config = Config(global_quant_config=W_INT8_A_INT8_PER_TENSOR_CONFIG)

# Example 2: W_UINT4_PER_GROUP with advanced algorithm
quant_config = Config(global_quant_config=W_UINT4_PER_GROUP_CONFIG, algo_config=ALGORITHM_CONFIG)
EXCLUDE_LAYERS = ["lm_head"] # For language models
quant_config = replace(quant_config, exclude=EXCLUDE_LAYERS)

# Example 3: W_FP8_A_FP8_PER_TENSOR with KV_CACHE_FP8
quant_config = Config(global_quant_config=W_FP8_A_FP8_PER_TENSOR_CONFIG)
KV_CACHE_CFG = {
            "*.v_proj":
            QuantizationConfig(input_tensors=quant_config.global_quant_config.input_tensors,
                               weight=quant_config.global_quant_config.weight,
                               output_tensors=FP8_PER_TENSOR_SPEC),
            "*.k_proj":
            QuantizationConfig(input_tensors=quant_config.global_quant_config.input_tensors,
                               weight=quant_config.global_quant_config.weight,
                               output_tensors=FP8_PER_TENSOR_SPEC),
        }
quant_config = replace(quant_config, layer_quant_config=KV_CACHE_CFG)
"""

# The seed's ``from quark.torch import LLMTemplate`` line (template layer) sits between these two.
TEMPLATE_SECTION4_IMPORT = """\
from quark.torch.quantization.config.config import Int8PerTensorSpec, QuantizationConfig
"""

TEMPLATE_SECTION4_SPEC = """\
# Create custom quantization specification
quant_spec = Int8PerTensorSpec(
    observer_method="min_max",
    symmetric=True,
    scale_type="float",
    round_method="half_even",
    is_dynamic=False
).to_quantization_spec()
"""

TEMPLATE_SECTION4_CONFIG = """\
global_config = QuantizationConfig(weight=quant_spec)
"""


def _run(*blocks: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, "<seed block>", "exec"), namespace)
    return namespace


def _normalise(text: str) -> str:
    """Drop leading indentation and trailing spaces, as the .rst code directive indents blocks."""
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


@pytest.mark.parametrize(
    ("seed", "block"),
    [
        ("configuring-quantization.rst", STEP1),
        ("configuring-quantization.rst", STEP2),
        ("configuring-quantization.rst", STEP3_PROCESSOR_IMPORTS + "\n" + STEP3_CONFIGS),
        ("configuring-quantization.rst", STEP4),
        ("llm-template.rst", TEMPLATE_SECTION4_IMPORT),
        ("llm-template.rst", TEMPLATE_SECTION4_SPEC),
        ("llm-template.rst", TEMPLATE_SECTION4_CONFIG),
    ],
)
def test_blocks_are_verbatim_copies(seed: str, block: str) -> None:
    path = SEEDS / seed
    if not path.exists():
        pytest.skip(f"seed document {path} not available")
    assert _normalise(block) in _normalise(path.read_text())


def test_step1_specs() -> None:
    ns = _run(STEP1)
    from quark.torch.quantization.observer.observer import (
        PerGroupMinMaxObserver,
        PerTensorMinMaxObserver,
        PlaceholderObserver,
    )

    assert ns["BFLOAT16_SPEC"].dtype is Dtype.bfloat16
    assert ns["BFLOAT16_SPEC"].observer_cls is PlaceholderObserver
    fp8 = ns["FP8_PER_TENSOR_SPEC"]
    assert (fp8.dtype, fp8.qscheme, fp8.observer_cls, fp8.is_dynamic) == (
        Dtype.fp8_e4m3, QSchemeType.per_tensor, PerTensorMinMaxObserver, False)
    int8 = ns["INT8_PER_TENSER_SPEC"]
    assert (int8.symmetric, int8.scale_type, int8.round_method) == (True, ScaleType.float, RoundType.half_even)
    uint4 = ns["UINT4_PER_GROUP_ASYM_SPEC"]
    assert uint4.observer_cls is PerGroupMinMaxObserver
    assert (uint4.dtype, uint4.qscheme, uint4.ch_axis, uint4.group_size, uint4.symmetric) == (
        Dtype.uint4, QSchemeType.per_group, 1, 128, False)
    for name in ("BFLOAT16_SPEC", "FP8_PER_TENSOR_SPEC", "INT8_PER_TENSER_SPEC", "UINT4_PER_GROUP_ASYM_SPEC"):
        assert QuantizationSpec.from_dict(ns[name].to_dict()) == ns[name]


def test_step2_layer_configs() -> None:
    ns = _run(STEP1, STEP2)
    fp8 = ns["W_FP8_A_FP8_PER_TENSOR_CONFIG"]
    assert fp8.input_tensors == fp8.weight == ns["FP8_PER_TENSOR_SPEC"]
    assert fp8.output_tensors is None and fp8.bias is None
    assert ns["W_UINT4_PER_GROUP_CONFIG"].weight == ns["UINT4_PER_GROUP_ASYM_SPEC"]
    assert ns["W_UINT4_PER_GROUP_CONFIG"].input_tensors is None
    for name in ("W_FP8_A_FP8_PER_TENSOR_CONFIG", "W_INT8_A_INT8_PER_TENSOR_CONFIG", "W_UINT4_PER_GROUP_CONFIG"):
        assert QuantizationConfig.from_dict(ns[name].to_dict()) == ns[name]


def test_step3_algorithm_configs() -> None:
    # Each assignment of the block is checked by re-running the block prefix that defines it.
    awq_block, rest = STEP3_CONFIGS.split("ALGORITHM_CONFIG=SmoothQuantConfig(")
    smooth_block = "ALGORITHM_CONFIG=SmoothQuantConfig(" + rest.split("ALGORITHM_CONFIG=GPTQConfig(")[0]
    awq = _run(awq_block)["ALGORITHM_CONFIG"]
    smooth = _run(awq_block, smooth_block)["ALGORITHM_CONFIG"]
    gptq = _run(STEP3_CONFIGS)["ALGORITHM_CONFIG"]
    assert isinstance(awq, AWQConfig) and len(awq.scaling_layers) == 4
    assert awq.scaling_layers[1]["condition"].startswith("module.self_attn.v_proj")
    assert awq.model_decoder_layers == "model.layers" and awq.embedding_layers == ["model.embed_tokens"]
    assert isinstance(smooth, SmoothQuantConfig) and (smooth.alpha, smooth.scale_clamp_min) == (0.5, 0.001)
    assert isinstance(gptq, GPTQConfig) and gptq.damp_percent == 0.01 and len(gptq.inside_layer_modules) == 7
    for cfg in (awq, smooth, gptq):
        assert type(cfg).from_dict(cfg.to_dict()) == cfg


def test_step3_verbatim_with_processor_imports() -> None:
    for module in ("quark.torch.algorithm.awq.awq", "quark.torch.algorithm.awq.smooth",
                   "quark.torch.algorithm.gptq.gptq"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            pytest.skip(f"{module} (algorithm layer) not available yet")
    ns = _run(STEP3_PROCESSOR_IMPORTS + "\n" + STEP3_CONFIGS)
    assert isinstance(ns["ALGORITHM_CONFIG"], GPTQConfig)


def test_step4_configs() -> None:
    ns = _run(STEP1, STEP2, STEP3_CONFIGS, STEP4_PREAMBLE)
    ex1 = _run_prefix(ns, STEP4, "# Example 2")
    assert ex1 == Config(global_quant_config=ns["W_INT8_A_INT8_PER_TENSOR_CONFIG"])
    ex2 = _run_prefix(ns, STEP4, "# Example 3")
    assert ex2.exclude == ["lm_head"]
    assert ex2.algo_config == [ns["ALGORITHM_CONFIG"]]
    assert ex2.global_quant_config == ns["W_UINT4_PER_GROUP_CONFIG"]
    exec(compile(STEP4, "<seed block>", "exec"), ns)
    ex3: Config = ns["quant_config"]
    assert sorted(ex3.layer_quant_config) == ["*.k_proj", "*.v_proj"]
    assert ex3.layer_quant_config["*.k_proj"].output_tensors == ns["FP8_PER_TENSOR_SPEC"]
    assert ex3.exclude == []
    for cfg in (ex1, ex2, ex3):
        assert Config.from_dict(cfg.to_dict()) == cfg


def _run_prefix(ns: dict[str, Any], block: str, stop: str) -> Config:
    exec(compile(block.split(stop)[0], "<seed block>", "exec"), ns)
    return ns["quant_config"]


def test_llm_template_section4_spec() -> None:
    ns = _run(TEMPLATE_SECTION4_IMPORT, TEMPLATE_SECTION4_SPEC, TEMPLATE_SECTION4_CONFIG)
    spec = ns["quant_spec"]
    assert spec == QuantizationSpec(dtype=Dtype.int8, qscheme=QSchemeType.per_tensor,
                                    observer_cls="PerTensorMinMaxObserver", symmetric=True,
                                    scale_type=ScaleType.float, round_method=RoundType.half_even,
                                    is_dynamic=False)
    assert ns["global_config"] == QuantizationConfig(weight=spec)


def test_trailing_space_normalisation_does_not_hide_differences() -> None:
    # Guard for the verbatim check: a changed token must not survive normalisation.
    assert _normalise("a = 1  \n  b = 2") == "a = 1\nb = 2"
    assert _normalise(STEP2) not in _normalise(re.sub("weight=FP8", "weight=INT8", STEP2))
