"""AWQ, GPTQ and SmoothQuant on every weight format a quantizer supports (issue 14, item 1).

The searches judge candidates with the format's own fake quantization: integers, scaled fp8,
two-stage fp4 (per group 16) whose scales are fp8 per tensor, OCP MX (fp4, fp6, fp8, int8
elements), BFP16 and MX6. Checked here: the search grid reproduces the module's quantizer bit for
bit; GPTQ's columns are a fixed point of that quantizer and beat round-to-nearest on the
Hessian-weighted error; each algorithm runs end to end on a tiny Llama; the seeds' LLM-template
"advanced options" example (int4 + AWQ with MXFP4 MLP layers) quantizes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import transformers
from tiny_models import make_batches, make_model
from torch import nn

from quark.torch import LLMTemplate, ModelQuantizer
from quark.torch.algorithm.awq.awq import clip_search, group_input_covariance
from quark.torch.algorithm.gptq.math import accumulate_hessian, gptq_quantize
from quark.torch.algorithm.utils.quant import (
    ALL_QSCHEMES,
    ALL_WEIGHT_DTYPES,
    WeightGrid,
    fake_quant_weight,
    weight_grid_from_spec,
)
from quark.torch.algorithm.utils.specs import set_weight_qparams
from quark.torch.quantization.config.config import (
    AutoSmoothQuantConfig,
    AWQConfig,
    Config,
    GPTQConfig,
    QuantizationConfig,
    QuantizationSpec,
    SmoothQuantConfig,
)
from quark.torch.quantization.config.custom_config import (
    BFLOAT16_SPEC,
    FP8_PER_CHANNEL_SPEC,
    FP8_PER_TENSOR_SPEC,
    INT8_PER_CHANNEL_SPEC,
)
from quark.torch.quantization.config.spec_helpers import FP4PerGroupSpec, FP8E4M3PerTensorSpec, ScaleQuantSpec
from quark.torch.quantization.config.templates.schemes import BUILTIN_SCHEMES
from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.tensor_quantize import FakeQuantize


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tiny tensors gain nothing from intra-op threads; on a shared CPU they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _builtin(name: str) -> QuantizationSpec:
    return BUILTIN_SCHEMES[name]().weight


def _two_stage() -> list[QuantizationSpec]:
    return ScaleQuantSpec(FP4PerGroupSpec(group_size=16, is_dynamic=False),
                          FP8E4M3PerTensorSpec(is_dynamic=False)).to_quantization_spec()


def _mxint8() -> QuantizationSpec:
    return QuantizationSpec(dtype=Dtype.mx, mx_element_dtype=Dtype.int8, qscheme=QSchemeType.per_group,
                            group_size=32, ch_axis=-1, is_dynamic=False)


# name -> weight spec (every one divides a 64-wide input)
FORMATS = {
    "int4_g32": lambda: _builtin("int4_wo_32"),
    "uint4_g32": lambda: _builtin("uint4_wo_32"),
    "int8_per_channel": lambda: INT8_PER_CHANNEL_SPEC,
    "fp8_per_tensor": lambda: FP8_PER_TENSOR_SPEC,
    "fp8_per_channel": lambda: FP8_PER_CHANNEL_SPEC,
    "fp4_scale_fp8": _two_stage,
    "mxfp4": lambda: _builtin("mxfp4"),
    "mxfp6_e3m2": lambda: _builtin("mxfp6_e3m2"),
    "mxfp6_e2m3": lambda: _builtin("mxfp6_e2m3"),
    "mxint8": _mxint8,
    "mx6": lambda: _builtin("mx6"),
    "bfp16": lambda: _builtin("bfp16"),
}
# the combinations run end to end (one per format family)
E2E_FORMATS = ["int4_g32", "fp8_per_tensor", "fp4_scale_fp8", "mxfp4", "mxfp6_e3m2", "mx6", "bfp16"]


def _grid(spec: object, cols: int = 64) -> WeightGrid:
    return weight_grid_from_spec(spec, "test", cols, allowed=ALL_QSCHEMES, dtypes=ALL_WEIGHT_DTYPES)


def _weight(seed: int = 0, out: int = 24, cols: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=gen) * 0.05
    w[:, 5] *= 12.0  # an outlier column
    return w


def _inputs(seed: int = 1, n: int = 400, cols: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)  # correlated channels
    return (torch.randn(n, cols, generator=gen) * (torch.rand(cols, generator=gen) * 2 + 0.2)) @ mix


def _quantizer(spec: object, w: torch.Tensor) -> FakeQuantize:
    q = FakeQuantize(spec)
    q.calibrate_from(w)
    return q


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_search_grid_is_the_quantizers_own_fake_quantize(name: str) -> None:
    spec = FORMATS[name]()
    w = _weight()
    torch.testing.assert_close(fake_quant_weight(w, _grid(spec)), _quantizer(spec, w)(w), rtol=0, atol=0)


@pytest.mark.parametrize("static_groups", [True, False])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_gptq_is_a_fixed_point_of_the_quantizer_and_beats_rtn(name: str, static_groups: bool) -> None:
    spec = FORMATS[name]()
    grid = _grid(spec)
    if grid.scale_dtype is not None and not static_groups:
        with pytest.raises(ValueError, match="static_groups=False with a two-stage"):
            gptq_quantize(_weight(), torch.eye(64), grid, static_groups=False)
        return
    w, x = _weight(), _inputs()
    h, _ = accumulate_hessian(None, 0, x)
    res = gptq_quantize(w, h, grid, desc_act=static_groups, static_groups=static_groups)
    quantizer = _quantizer(spec, w)
    if not grid.is_block:
        set_weight_qparams(nn.Module(), res.scale, res.zero_point)  # a module without quantizer: no-op
        holder = nn.Module()
        holder.weight_quantizer = quantizer
        assert set_weight_qparams(holder, res.scale, res.zero_point, res.scale2)
    else:
        quantizer = _quantizer(spec, res.weight)  # block formats recompute their exponents from the weight
    torch.testing.assert_close(quantizer(res.weight), res.weight, rtol=0, atol=0)

    def output_error(q: torch.Tensor) -> float:
        return float(((x @ (q - w).T) ** 2).mean())

    assert output_error(res.weight) < output_error(fake_quant_weight(w, grid))


@pytest.mark.parametrize("name", ["int4_g32", "fp4_scale_fp8", "mxfp4", "mx6", "bfp16"])
def test_clip_search_never_raises_the_output_error(name: str) -> None:
    grid = _grid(FORMATS[name]())
    w, x = _weight(3), _inputs(4)
    clipped = clip_search(w, group_input_covariance(x, grid.group_size), grid)
    assert (clipped.abs() <= w.abs()).all()

    def output_error(q: torch.Tensor) -> float:
        return float(((x @ (q - w).T) ** 2).mean())

    # per (row, group) the search keeps min-max unless a ratio is strictly better
    assert output_error(fake_quant_weight(clipped, grid)) <= output_error(fake_quant_weight(w, grid)) * (1 + 1e-5)


def test_clip_search_leaves_a_per_tensor_grid_alone() -> None:
    grid = _grid(FP8_PER_TENSOR_SPEC)
    w = _weight()
    assert torch.equal(clip_search(w, group_input_covariance(_inputs(), 64)[None, 0], grid), w)


CALIB = make_batches(4, seq=32, seed=1)
HELD_OUT = make_batches(2, seq=32, seed=2)


def _quantize(weight: object, algo: list) -> tuple[nn.Module, nn.Module]:
    model = make_model("llama")
    q = copy.deepcopy(model)
    config = Config(global_quant_config=QuantizationConfig(weight=copy.deepcopy(weight)), exclude=["lm_head"],
                    algo_config=algo)
    ModelQuantizer(config).quantize_model(q, CALIB)
    return model, q


def _logit_error(model: nn.Module, q: nn.Module) -> float:
    with torch.no_grad():
        return sum(float(((q(b).logits - model(b).logits) ** 2).mean()) for b in HELD_OUT)


# AutoSmoothQuant simulates weights through the spec itself: its two-stage and block paths suffice
E2E_CASES = [(n, a) for a in ("awq", "gptq", "smoothquant") for n in E2E_FORMATS] + [
    (n, "autosmoothquant") for n in ("fp4_scale_fp8", "mxfp4", "mx6")]


@pytest.mark.parametrize("name,algo", E2E_CASES)
def test_algorithms_run_on_every_weight_format(name: str, algo: str) -> None:
    configs = {"awq": [AWQConfig()], "gptq": [GPTQConfig()], "smoothquant": [SmoothQuantConfig(alpha=0.5)],
               "autosmoothquant": [AutoSmoothQuantConfig()]}
    model, q = _quantize(FORMATS[name](), configs[algo])
    err = _logit_error(model, q)
    assert 0 < err < float("inf")
    down = q.model.layers[1].mlp.down_proj
    w = down.weight.detach()
    if algo == "gptq":  # the quantizer reproduces GPTQ's weights: its grid is the one GPTQ rounded on
        torch.testing.assert_close(down.weight_quantizer(w), w, rtol=0, atol=0)
    if algo == "awq" and name != "fp8_per_tensor":  # AWQ rescaled the MLP: down_proj's input columns changed
        # (a per-tensor fp8 grid has the same relative precision at every scale: AWQ may keep s = 1)
        assert not torch.equal(w, model.model.layers[1].mlp.down_proj.weight)


def test_awq_and_gptq_beat_rtn_on_mxfp4() -> None:
    spec = FORMATS["mxfp4"]()
    rtn = _logit_error(*_quantize(spec, []))
    awq = _logit_error(*_quantize(spec, [AWQConfig()]))
    gptq = _logit_error(*_quantize(spec, [GPTQConfig()]))
    assert awq < rtn and gptq < rtn, (awq, gptq, rtn)


@pytest.mark.parametrize("weight,algo,match", [
    (BFLOAT16_SPEC, AWQConfig(), "plain cast"),
    (BFLOAT16_SPEC, GPTQConfig(), "plain cast"),
    (_two_stage(), GPTQConfig(static_groups=False, desc_act=False), "two-stage"),
    ([_builtin("mxfp4"), FP8_PER_TENSOR_SPEC], AWQConfig(), "meaningless"),
])
def test_meaningless_combinations_say_why_before_weights_change(weight: object, algo: object, match: str) -> None:
    model = make_model("llama")
    before = copy.deepcopy(model.state_dict())
    config = Config(global_quant_config=QuantizationConfig(weight=weight), exclude=["lm_head"], algo_config=[algo])
    with pytest.raises(ValueError, match=match):
        ModelQuantizer(config).quantize_model(model, CALIB)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_seeds_advanced_options_example_with_mxfp4_mlp() -> None:
    """llm-template.rst, "Creating Configurations with Advanced Options" (hidden 128: group 128 fits)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    config = LLMTemplate.get("llama").get_config(
        scheme="int4_wo_128", algorithm="awq", kv_cache_scheme="fp8", min_kv_scale=1.0, attention_scheme="fp8",
        layer_config={"*.mlp.gate_proj": "mxfp4", "*.mlp.up_proj": "mxfp4", "*.mlp.down_proj": "mxfp4"},
        layer_type_config={nn.LayerNorm: "fp8"}, exclude_layers=["lm_head"])
    ModelQuantizer(config).quantize_model(model, make_batches(2, seq=16, seed=1))
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.weight_quantizer.kind == "mx"
    with torch.no_grad():
        assert torch.isfinite(model(make_batches(1, seq=16, seed=3)[0]).logits).all()
