"""GPTQ beyond integer per-group weights: per-tensor and FP8 grids, the clipping search, and QuaRot.

References are written here: an unblocked one-column-at-a-time GPTQ with a fixed quantizer
function, torch's own ``float8_e4m3fn`` cast for FP8, and hand-computed weighted errors.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn

from quark.torch import LLMTemplate
from quark.torch.algorithm.api import apply_pre_quant_optimization
from quark.torch.algorithm.gptq.math import (
    accumulate_cross,
    accumulate_hessian,
    float_target_weight,
    gptq_quantize,
    group_params,
)
from quark.torch.algorithm.utils.quant import WeightGrid
from quark.torch.quantization.calibration.layerwise import float_linears
from quark.torch.quantization.config.algo import GPTQConfig, algo_config_from_dict
from quark.torch.quantization.config.config import Config, QuantizationConfig, QuaRotConfig
from quark.torch.quantization.config.custom_config import INT8_PER_TENSOR_SPEC
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
from tests.helpers.tiny_models import tiny_model, token_batches


def _problem(out: int = 12, cols: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=gen, dtype=torch.float64)
    x = torch.randn(400, cols, generator=gen, dtype=torch.float64) * (torch.rand(cols, generator=gen) * 3 + 0.1)
    h, _ = accumulate_hessian(None, 0, x)
    return w, h.double(), x


def _unblocked(w: torch.Tensor, h: torch.Tensor, quantize, damp: float = 0.01) -> torch.Tensor:
    """Textbook GPTQ in natural column order with a fixed per-column quantizer."""
    w = w.clone()
    cols = w.shape[1]
    hd = h + damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    out = torch.zeros_like(w)
    for j in range(cols):
        q = quantize(w[:, j])
        out[:, j] = q
        err = (w[:, j] - q) / u[j, j]
        w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
    return out


def test_per_tensor_int8_matches_unblocked_reference() -> None:
    w, h, _ = _problem()
    scale = w.abs().max() / 127.5  # symmetric int8: amax / ((qmax - qmin) / 2)
    expected = _unblocked(w, h, lambda c: torch.round(c / scale).clamp(-128, 127) * scale)
    grid = WeightGrid(Dtype.int8, QSchemeType.per_tensor, w.shape[1], True, RoundType.half_even)
    res = gptq_quantize(w, h, grid, block_size=32)
    assert res.scale.shape == ()
    torch.testing.assert_close(res.scale, scale, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.weight, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("qscheme", [QSchemeType.per_tensor, QSchemeType.per_channel])
def test_fp8_matches_torch_cast_reference(qscheme: QSchemeType) -> None:
    w, h, x = _problem(seed=3)
    per_tensor = qscheme == QSchemeType.per_tensor
    amax = w.abs().max() if per_tensor else w.abs().amax(dim=1)
    scale = (amax / 448.0).float().double()  # the quantizer's float32 scale

    def fp8(c: torch.Tensor) -> torch.Tensor:
        s = scale if per_tensor else (scale if c.dim() == 1 else scale[:, None])
        return (c / s).float().clamp(-448, 448).to(torch.float8_e4m3fn).double() * s

    expected = _unblocked(w, h, fp8)
    grid = WeightGrid(Dtype.fp8_e4m3, qscheme, w.shape[1], True, RoundType.half_even)
    res = gptq_quantize(w, h, grid, block_size=32)
    # the quantizer multiplies in float32 (as the model's FP8 quantizer does), the reference in float64
    torch.testing.assert_close(res.weight, expected, rtol=1e-6, atol=1e-9)
    # every value is an fp8 code times the (float32) scale
    codes = res.weight / (res.scale.float().double() if per_tensor else res.scale.float().double()[:, None])
    torch.testing.assert_close(codes.float().to(torch.float8_e4m3fn).double(), codes, rtol=1e-6, atol=0)
    # and the layer output is closer to the float one than round-to-nearest fp8's
    gptq_err = ((x @ (w - res.weight).t()) ** 2).mean()
    rtn_err = ((x @ (w - fp8(w)).t()) ** 2).mean()
    assert gptq_err < 0.95 * rtn_err  # measured 0.87


def test_group_params_clip_search_never_worse_and_helps_outliers() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((16, 4, 32)).double()  # heavy tails: clipping pays
    hdiag = torch.rand(4, 32, generator=gen, dtype=torch.float64) + 0.1
    grid = WeightGrid(Dtype.int4, QSchemeType.per_group, 32, True, RoundType.half_even)

    def weighted_error(scale: torch.Tensor) -> torch.Tensor:
        q = torch.round(w / scale[..., None]).clamp(-8, 7) * scale[..., None]
        return ((w - q) ** 2 * hdiag).sum(-1)

    minmax, _ = group_params(w, grid, hdiag, 0)
    torch.testing.assert_close(minmax, w.abs().amax(-1) / 7.5)
    searched, _ = group_params(w, grid, hdiag, 40)
    before, after = weighted_error(minmax), weighted_error(searched)
    assert bool((after <= before + 1e-12).all())
    assert float(after.sum()) < 0.95 * float(before.sum())  # measured 0.88
    assert bool((searched <= minmax + 1e-12).all()) and bool((searched >= 0.5 * minmax - 1e-12).all())


def test_gptq_clip_search_lowers_output_error_on_heavy_tailed_weights() -> None:
    torch.manual_seed(1)
    w = torch.distributions.StudentT(2.5).sample((32, 128)).double()
    x = torch.randn(600, 128, dtype=torch.float64)
    h, _ = accumulate_hessian(None, 0, x[:300])
    grid = WeightGrid(Dtype.int4, QSchemeType.per_group, 32, True, RoundType.half_even)
    held_out = x[300:]

    def err(q: torch.Tensor) -> float:
        return float(((held_out @ (w - q).t()) ** 2).mean())

    plain = gptq_quantize(w, h, grid, desc_act=True, static_groups=True)
    clipped = gptq_quantize(w, h, grid, desc_act=True, static_groups=True, clip_steps=40)
    assert err(clipped.weight) < 0.9 * err(plain.weight)


def test_gptq_config_clip_search_steps_field() -> None:
    assert GPTQConfig().clip_search_steps == 40
    assert "clip_search_steps" not in GPTQConfig().to_dict()  # reference keys at the default
    off = GPTQConfig(clip_search_steps=0)
    assert algo_config_from_dict(off.to_dict()).clip_search_steps == 0
    for bad in (-1, 2.5, True, "40"):
        with pytest.raises(ValueError, match=r"GPTQConfig\.clip_search_steps"):
            GPTQConfig(clip_search_steps=bad)


def test_float_linears_applies_the_online_rotation_of_a_quantized_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    h = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    for _ in range(3):
        h = torch.kron(h, torch.tensor([[1, 1], [1, -1]], dtype=torch.int8))
    linear.input_rotation = h
    module = QuantLinear.from_float(linear, QuantizationConfig(weight=INT8_PER_TENSOR_SPEC))
    x = torch.randn(5, 16)
    expected = nn.functional.linear(x @ h.float() / math.sqrt(16), linear.weight, linear.bias)
    with float_linears(module), torch.no_grad():
        torch.testing.assert_close(module(x), expected)


def test_smoothquant_after_quarot_skips_the_rotated_down_proj(caplog: pytest.LogCaptureFixture) -> None:
    batches = token_batches(4, 16, seed=5)
    model = tiny_model("llama")
    empty = Config(global_quant_config=QuantizationConfig())
    apply_pre_quant_optimization(model, [QuaRotConfig()], empty, batches, "cpu")
    assert getattr(model.model.layers[0].mlp.down_proj, "input_rotation", None) is not None
    with torch.no_grad():
        before = model(batches[0]).logits
    smooth = LLMTemplate.get("llama").get_config(scheme="int8", algorithm=["smoothquant"])
    sq = [a for a in [*(smooth.pre_quant_opt_config or []), *(smooth.algo_config or [])]
          if a.name in ("smoothquant", "smooth")]
    scaled = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING):
        apply_pre_quant_optimization(scaled, sq, empty, batches, "cpu")
    assert "mlp.down_proj rotates its input online" in caplog.text
    with torch.no_grad():
        after = scaled(batches[0]).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # the other groups were scaled
    q_scaled, q_rotated = scaled.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_scaled, q_rotated)


@pytest.mark.parametrize("scheme,algorithms", [("w_fp8_a_fp8", ["gptq"]),
                                               ("w_int8_a_int8_per_tensor_sym", ["quarot", "gptq"])])
def test_gptq_w8a8_checkpoints_reload_in_transformers(tmp_path, scheme: str, algorithms: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    from quark.torch.llm import schemes
    from tests.export.helpers import quantize_and_export

    batches = token_batches(4, 16, seed=9)
    model = tiny_model("llama")
    config = schemes.build_config(LLMTemplate.get("llama"), schemes.SchemeRequest(scheme, algorithms=algorithms))
    ref = quantize_and_export(model, config, batches, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batches[0]).logits, ref, rtol=0, atol=1e-5)


def test_float_target_weight_is_the_least_squares_solution() -> None:
    torch.manual_seed(4)
    w = torch.randn(6, 20, dtype=torch.float64)
    x = torch.randn(300, 20, dtype=torch.float64)  # quantized model's inputs
    x_float = x + 0.1 * torch.randn(300, 20, dtype=torch.float64)  # float model's inputs
    h, _ = accumulate_hessian(None, 0, x)
    cross = accumulate_cross(None, 0, x_float, x)
    shifted = float_target_weight(w, h, cross, damp_percent=1e-9)
    # argmin_V ||x_float wᵀ - x Vᵀ||², solved independently
    expected = torch.linalg.lstsq(x, x_float @ w.t()).solution.t()
    torch.testing.assert_close(shifted, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_match_float_outputs_lowers_the_models_logit_error(family: str) -> None:
    from quark.torch import ModelQuantizer
    from quark.torch.llm import schemes

    batches = token_batches(8, 32, seed=3)
    base = tiny_model(family)
    errors = {}
    for match in (False, True):
        model = copy.deepcopy(base)
        config = schemes.build_config(LLMTemplate.get(family), schemes.SchemeRequest(
            "w_int4_per_group_sym", group_size=16, algorithms=["gptq"]))
        config.algo_config[0].match_float_outputs = match
        ModelQuantizer(config).quantize_model(model, batches)
        with torch.no_grad():
            errors[match] = sum(float((model(b).logits - base(b).logits).pow(2).mean()) for b in batches)
    assert errors[True] < 0.6 * errors[False]  # measured 0.23 (llama), 0.37 (opt)


def test_linears_fed_the_same_input_share_one_hessian(monkeypatch):
    """q/k/v (and gate/up) see one tensor: its Hessian is accumulated once; and only the first
    true-sequential group's Hessians come from the runner's pass (the others are collected again)."""
    from quark.torch import LLMTemplate, ModelQuantizer
    from quark.torch.algorithm.gptq import gptq as gptq_module
    from tests.helpers.tiny_models import tiny_model, token_batches

    calls = []
    real = gptq_module.accumulate_hessian_sum

    def counting(h, count, x):
        calls.append(x.shape[-1])
        return real(h, count, x)

    monkeypatch.setattr(gptq_module, "accumulate_hessian_sum", counting)
    model = tiny_model("llama")
    config = LLMTemplate.get("llama").get_config(scheme="int4_wo_32", algorithm="gptq")
    ModelQuantizer(config).quantize_model(model, token_batches(4, seq=32))
    # per batch: layer 0 has no runner pass (its groups are learned first), apply() collects {qkv}, o,
    # {gate,up}, down once each (4); layer 1's pass feeds only {qkv} (1), then o, {gate,up}, down (3).
    # 4 batches. (Unshared, or every linear collected in the first pass: more.)
    assert len(calls) == 4 * (4 + 1 + 3)
