"""GPTQ math against an unblocked, one-column-at-a-time reference written here."""

from __future__ import annotations

import pytest
import torch

from quark.torch.algorithm.gptq.math import accumulate_hessian, gptq_quantize
from quark.torch.algorithm.utils.quant import WeightGrid, fake_quant_weight
from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType


def _qparams(w: torch.Tensor, dtype: Dtype, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.double()
    qmin, qmax = {Dtype.int4: (-8, 7), Dtype.uint4: (0, 15), Dtype.int8: (-128, 127)}[dtype]
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    if symmetric:
        s = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp(min=torch.finfo(torch.float32).eps)
        z = torch.zeros_like(s) if qmin < 0 else torch.full_like(s, 8.0)
    else:
        s = ((hi - lo) / (qmax - qmin)).clamp(min=torch.finfo(torch.float32).eps)
        z = (qmin - torch.round(lo / s)).clamp(qmin, qmax)
    return s, z


def _reference(w, h, dtype, symmetric, group, damp, desc_act, static):
    """Textbook GPTQ: one column at a time, full update of every later column after each."""
    qmin, qmax = {Dtype.int4: (-8, 7), Dtype.uint4: (0, 15), Dtype.int8: (-128, 127)}[dtype]
    w = w.clone().double()
    h = h.clone().double()
    cols = w.shape[1]
    group = group or cols
    static_params = [_qparams(w[:, g:g + group], dtype, symmetric) for g in range(0, cols, group)]
    order = torch.argsort(torch.diag(h), descending=True) if desc_act else torch.arange(cols)
    h = h + damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    hp = h[order][:, order]
    u = torch.linalg.cholesky(torch.linalg.inv(hp), upper=True)
    wp = w[:, order]
    out = torch.zeros_like(wp)
    params = None
    for j in range(cols):
        g = int(order[j]) // group
        if static or group == cols:
            params = static_params[g]
        elif j % group == 0:
            params = _qparams(wp[:, j:j + group], dtype, symmetric)
        s, z = params[0].double(), params[1].double()
        # the quantizers' convention, x * (1 / s) (formats.divide_by_scale), so that no tie flips
        q = (torch.round(wp[:, j] * (1 / s)) + z).clamp(qmin, qmax)
        qc = (q - z) * s
        out[:, j] = qc
        err = (wp[:, j] - qc) / u[j, j]
        wp[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
    return out[:, torch.argsort(order)].float()


def _problem(out=16, cols=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=gen)
    x = torch.randn(512, cols, generator=gen) * (torch.rand(cols, generator=gen) * 3 + 0.1)
    h, _ = accumulate_hessian(None, 0, x[:300])
    h, n = accumulate_hessian(h, 300, x[300:])
    assert n == 512
    return w, h, x


@pytest.mark.parametrize("dtype,symmetric,group,desc,static", [
    (Dtype.int4, True, 32, False, False),
    (Dtype.uint4, False, 64, True, True),
    (Dtype.int4, True, 32, True, True),
    (Dtype.uint4, False, 32, False, False),
    (Dtype.int8, True, None, True, True),
    (Dtype.uint4, False, None, False, True),
])
def test_gptq_matches_unblocked_reference(dtype, symmetric, group, desc, static):
    w, h, x = _problem()
    qs = QSchemeType.per_group if group else QSchemeType.per_channel
    grid = WeightGrid(dtype, qs, group or w.shape[1], symmetric, RoundType.half_even)
    # Both in float64 so that no rounding tie flips between the blocked and unblocked orders.
    res64 = gptq_quantize(w.double(), h.double(), grid, damp_percent=0.01, desc_act=desc,
                          static_groups=static, block_size=128)
    ref = _reference(w, h, dtype, symmetric, group, 0.01, desc, static)
    assert torch.allclose(res64.weight.float(), ref, rtol=1e-5, atol=1e-6)
    res = gptq_quantize(w, h, grid, damp_percent=0.01, desc_act=desc, static_groups=static, block_size=128)
    # The weight lies on the returned grid.
    s = res.scale if res.scale.dim() == 2 else res.scale[:, None]
    z = res.zero_point if res.zero_point.dim() == 2 else res.zero_point[:, None]
    g = w.shape[1] // s.shape[1]
    q = res.weight.reshape(w.shape[0], -1, g) / s[..., None] + z[..., None]
    assert torch.allclose(q, q.round(), atol=1e-3)
    # And GPTQ beats round-to-nearest on the layer output.
    rtn = fake_quant_weight(w, grid)
    err_gptq = ((x @ (res.weight - w).t()) ** 2).mean()
    err_rtn = ((x @ (rtn - w).t()) ** 2).mean()
    assert err_gptq < err_rtn


def test_hessian_is_running_mean():
    x = torch.randn(40, 8)
    h, _ = accumulate_hessian(None, 0, x[:10])
    h, _ = accumulate_hessian(h, 10, x[10:])
    assert torch.allclose(h, 2 * x.t() @ x / 40, atol=1e-5)


def test_indefinite_hessian_retries_then_fails(caplog):
    w = torch.randn(4, 8)
    h = -torch.eye(8)
    grid = WeightGrid(Dtype.int4, QSchemeType.per_channel, 8, True, RoundType.half_even)
    with pytest.raises(RuntimeError, match=r"layer7.*not positive definite"):
        gptq_quantize(w, h, grid, name="layer7")
    assert "retrying" in caplog.text
    # A mildly singular Hessian is rescued by more damping.
    h2 = torch.ones(8, 8)
    res = gptq_quantize(w, h2, grid, damp_percent=0.0, name="x")
    assert res.damp >= 0.0 and torch.isfinite(res.weight).all()


def test_desc_act_without_static_groups_is_refused():
    w, h, _ = _problem(cols=64)
    grid = WeightGrid(Dtype.int4, QSchemeType.per_group, 32, True, RoundType.half_even)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(w, h, grid, desc_act=True, static_groups=False)


def test_a_hessian_not_positive_definite_is_damped_harder_and_left_as_it_was(caplog) -> None:
    from quark.torch.algorithm.gptq.math import _inverse_cholesky

    h = torch.diag(torch.tensor([1.0, -0.05], dtype=torch.float64))  # mean diagonal 0.475
    before = h.clone()
    with caplog.at_level("WARNING"):
        upper, damp = _inverse_cholesky(h, 0.01, "layer.q_proj")
    assert damp == 1.0  # 0.01 and 0.1 leave the diagonal negative; 1.0 adds 0.475
    assert torch.equal(h, before)  # damped in place for the factorisation only
    damped = before + torch.eye(2, dtype=torch.float64) * 0.475
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped))
    assert sum("not positive definite" in r.message for r in caplog.records) == 2
    with pytest.raises(RuntimeError, match=r"GPTQ layer.down_proj: .*not positive definite even with damp_percent"):
        _inverse_cholesky(torch.diag(torch.tensor([1.0, -1e6], dtype=torch.float64)), 0.01, "layer.down_proj")
