"""AWQ's weight clipping search over every calibration token (through each group's input covariance).

References are written here: the covariance as a plain per-group matrix product, and a
brute-force search that measures each candidate's output error token by token.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_models import make_batches, make_model

from quark.torch import LLMTemplate, ModelQuantizer
from quark.torch.algorithm.awq import awq
from quark.torch.algorithm.awq.awq import CLIP_STEPS, N_GRID, clip_search, group_input_covariance, scaled_covariance
from quark.torch.algorithm.utils import tokens
from quark.torch.algorithm.utils.quant import WeightGrid, fake_quant_weight
from quark.torch.quantization.config.algo import AWQConfig, algo_config_from_dict
from quark.torch.quantization.config.config import Config, QuantizationConfig
from quark.torch.quantization.config.custom_config import INT4_PER_GROUP_SYM_SPEC
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType

GRID = WeightGrid(Dtype.int4, QSchemeType.per_group, 16, True, RoundType.half_even)


def _problem(seed: int = 0, out: int = 10, cols: int = 48, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=gen)
    w[:, 5] *= 6.0  # a heavy column: clipping it trades its error against the group's resolution
    x = torch.randn(n, cols, generator=gen) * (torch.rand(cols, generator=gen) * 2 + 0.2)
    return w, x


def test_group_covariance_is_each_groups_second_moment() -> None:
    _, x = _problem()
    cov = group_input_covariance(x, 16, token_chunk=7)  # chunking must not change the sum
    assert cov.shape == (3, 16, 16)
    for g in range(3):
        xg = x[:, g * 16:(g + 1) * 16].double()
        torch.testing.assert_close(cov[g].double(), xg.T @ xg / x.shape[0], rtol=1e-5, atol=1e-6)


def test_group_covariance_caps_massive_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    _, x = _problem(n=40)
    x[0] *= 500.0  # an attention-sink-like token
    monkeypatch.setattr(tokens, "MASSIVE_TOKEN_RATIO", 10.0)
    capped = tokens.capped_tokens(x, 10.0)
    assert not torch.equal(capped, x)
    torch.testing.assert_close(group_input_covariance(x, 16), group_input_covariance(capped, 16, token_chunk=3))
    monkeypatch.setattr(tokens, "MASSIVE_TOKEN_RATIO", None)
    xg = x[:, :16].double()
    torch.testing.assert_close(group_input_covariance(x, 16)[0].double(), xg.T @ xg / 40, rtol=1e-5, atol=1e-3)


def _brute_force(w: torch.Tensor, x: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """Per (row, group): the candidate range whose quantized weights change the outputs least, token by token."""
    gs = grid.group_size
    out = w.clone()
    for o in range(w.shape[0]):
        for g in range(w.shape[1] // gs):
            wg = w[o, g * gs:(g + 1) * gs]
            xg = x[:, g * gs:(g + 1) * gs]
            best, best_err = None, float("inf")
            for i in range(CLIP_STEPS):
                mx = wg.abs().max() * (1 - i / N_GRID)
                cur = wg.clamp(-mx, mx)
                q = fake_quant_weight(cur[None], grid)[0]
                err = float(((xg @ (q - wg)) ** 2).mean())
                if err < best_err:
                    best, best_err = cur, err
            out[o, g * gs:(g + 1) * gs] = best
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_search_matches_token_by_token_brute_force(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "MASSIVE_TOKEN_RATIO", None)
    w, x = _problem(seed)
    got = clip_search(w, group_input_covariance(x, 16), GRID, oc_chunk=3)
    torch.testing.assert_close(got, _brute_force(w, x, GRID))


def test_clip_search_never_raises_output_error_and_clips_something(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "MASSIVE_TOKEN_RATIO", None)
    w, x = _problem(3)
    got = clip_search(w, group_input_covariance(x, 16), GRID)
    assert (got.abs() <= w.abs() + 1e-7).all()
    assert (got != w).any()
    err_clipped = ((x @ (fake_quant_weight(got, GRID) - w).T) ** 2).mean()
    err_minmax = ((x @ (fake_quant_weight(w, GRID) - w).T) ** 2).mean()
    assert err_clipped < err_minmax


def test_clip_search_rejects_a_covariance_of_other_groups() -> None:
    w, x = _problem()
    with pytest.raises(ValueError, match="covariance of shape"):
        clip_search(w, group_input_covariance(x, 8), GRID)


def test_scaled_covariance_is_the_covariance_of_the_scaled_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "MASSIVE_TOKEN_RATIO", None)
    _, x = _problem(4)
    scales = torch.rand(48, generator=torch.Generator().manual_seed(4)) * 3 + 0.1
    torch.testing.assert_close(scaled_covariance(group_input_covariance(x, 16), scales),
                               group_input_covariance(x / scales, 16), rtol=1e-5, atol=1e-6)


def _clip_calls(joint: bool, monkeypatch: pytest.MonkeyPatch, scaling_layers: list | None = None) -> int:
    calls: list[int] = []
    real = awq.clip_search

    def counting(w, cov, grid, oc_chunk=None, input_scales=None):
        calls.extend([w.shape[-1]] * (w.shape[0] if w.dim() == 3 else 1))  # one per weight clipped
        return real(w, cov, grid, oc_chunk, input_scales)

    monkeypatch.setattr(awq, "clip_search", counting)
    spec = replace(INT4_PER_GROUP_SYM_SPEC, group_size=32)
    config = Config(global_quant_config=QuantizationConfig(weight=spec), exclude=["lm_head"],
                    algo_config=[AWQConfig(clip_in_scale_search=joint, scaling_layers=scaling_layers)])
    ModelQuantizer(config).quantize_model(make_model("llama"), make_batches(2, seq=16, seed=1))
    return len(calls)


def test_clip_in_scale_search_clips_every_candidate(monkeypatch: pytest.MonkeyPatch) -> None:
    after_only = _clip_calls(False, monkeypatch)  # the reference: once per clipped linear, after the search
    assert after_only > 0
    assert _clip_calls(True, monkeypatch) == after_only * (awq.N_GRID + 1)


def test_groups_with_kwargs_clip_q_and_k_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seeds' JSON marks the attention group ``has_kwargs``; its q/k are clipped like the template's."""
    template = LLMTemplate.get("llama").get_config(scheme="int4_wo_32", algorithm="awq")
    groups = [dict(g) for g in template.algo_config[0].scaling_layers]
    for g in groups:
        g["has_kwargs"] = g.get("module2inspect") == "self_attn"
    assert any(g["has_kwargs"] for g in groups)
    assert _clip_calls(False, monkeypatch, groups) == _clip_calls(False, monkeypatch, None)


def test_awq_config_clip_in_scale_search_field() -> None:
    assert AWQConfig().clip_in_scale_search is True
    assert "clip_in_scale_search" not in AWQConfig().to_dict()  # reference keys at the default
    off = AWQConfig(clip_in_scale_search=False)
    assert algo_config_from_dict(off.to_dict()).clip_in_scale_search is False
    with pytest.raises(ValueError, match="clip_in_scale_search"):
        AWQConfig(clip_in_scale_search="yes")


def test_clip_search_of_a_batch_is_each_candidates_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scale search judges small layers' candidates in one batch: each with its own covariance."""
    monkeypatch.setattr(tokens, "MASSIVE_TOKEN_RATIO", None)
    w, x = _problem(5)
    cov = group_input_covariance(x, 16)
    scales = torch.rand(3, 48, generator=torch.Generator().manual_seed(5)) * 2 + 0.2
    ws = w[None] * scales[:, None, :]
    covs = torch.stack([scaled_covariance(cov, s) for s in scales])
    got = clip_search(ws, covs, GRID, oc_chunk=4)
    for k in range(3):
        torch.testing.assert_close(got[k], clip_search(ws[k], covs[k], GRID))
    with pytest.raises(ValueError, match="as many covariances"):
        clip_search(ws, covs[:2], GRID)
