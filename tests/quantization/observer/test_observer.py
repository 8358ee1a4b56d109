"""Observers against hand-computed qparams."""

from __future__ import annotations

import pytest
import torch

from quark.torch.quantization.config.config import QuantizationSpec
from quark.torch.quantization.config.type import Dtype, QSchemeType, ScaleType
from quark.torch.quantization.formats import fake_quantize
from quark.torch.quantization.observer.observer import (
    OBSERVER_CLASSES,
    PerBlockMXObserver,
    PerChannelMinMaxObserver,
    PerGroupMinMaxObserver,
    PerTensorMinMaxObserver,
    PerTensorMSEObserver,
    PerTensorPercentileObserver,
)


def spec(dtype=Dtype.int8, qscheme=QSchemeType.per_tensor, observer=PerTensorMinMaxObserver, **kw):
    return QuantizationSpec(dtype=dtype, qscheme=qscheme, observer_cls=observer, **kw)


def test_symmetric_int8_per_tensor_hand_computed():
    obs = PerTensorMinMaxObserver(spec(symmetric=True))
    obs(torch.tensor([-2.0, 1.0, 0.5]))
    scale, zp = obs.calculate_qparams()
    assert scale.item() == pytest.approx(2.0 / 127.5)
    assert zp.item() == 0


def test_asymmetric_uint8_hand_computed():
    obs = PerTensorMinMaxObserver(spec(Dtype.uint8, symmetric=False))
    obs(torch.tensor([-1.0, 3.0]))
    scale, zp = obs.calculate_qparams()
    assert scale.item() == pytest.approx(4.0 / 255)
    assert zp.item() == 64  # 0 - round(-1 / (4/255)) = round(63.75)
    assert zp.dtype == torch.int32


def test_running_minmax_across_batches():
    obs = PerTensorMinMaxObserver(spec(symmetric=True))
    obs(torch.tensor([1.0, -0.5]))
    obs(torch.tensor([0.2, -3.0]))
    scale, _ = obs.calculate_qparams()
    assert scale.item() == pytest.approx(3.0 / 127.5)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_axis(axis):
    x = torch.randn(6, 10)
    obs = PerChannelMinMaxObserver(spec(qscheme=QSchemeType.per_channel,
                                        observer=PerChannelMinMaxObserver, ch_axis=axis, symmetric=True))
    obs(x)
    scale, _ = obs.calculate_qparams()
    reduce_dim = 1 if axis == 0 else 0
    expected = x.abs().amax(dim=reduce_dim) / 127.5
    torch.testing.assert_close(scale, expected)


def test_per_group_partial_last_group():
    x = torch.randn(3, 172)
    obs = PerGroupMinMaxObserver(spec(Dtype.int4, QSchemeType.per_group, PerGroupMinMaxObserver,
                                      ch_axis=1, group_size=32, symmetric=True))
    obs(x)
    scale, _ = obs.calculate_qparams()
    assert scale.shape == (3, 6)
    torch.testing.assert_close(scale[:, -1], x[:, 160:].abs().amax(dim=1) / 7.5)


def test_fp8_scale_is_amax_over_448():
    obs = PerTensorMinMaxObserver(spec(Dtype.fp8_e4m3))
    obs(torch.tensor([0.1, -896.0]))
    scale, zp = obs.calculate_qparams()
    assert scale.item() == pytest.approx(2.0)
    assert zp.item() == 0


def test_pof2_scale_rounds_up_to_power_of_two():
    obs = PerTensorMinMaxObserver(spec(scale_type=ScaleType.pof2, symmetric=True))
    obs(torch.tensor([3.0]))
    scale, _ = obs.calculate_qparams()
    raw = 3.0 / 127.5
    assert scale.item() >= raw
    assert torch.log2(scale).item() == pytest.approx(round(torch.log2(scale).item()))
    assert scale.item() / 2 < raw


def test_float16_scale_type_dtype():
    obs = PerTensorMinMaxObserver(spec(scale_type=ScaleType.float16))
    obs(torch.tensor([1.0]))
    scale, _ = obs.calculate_qparams()
    assert scale.dtype == torch.float16


def test_all_zero_tensor_gives_positive_scale_and_exact_zeros():
    for dtype, symmetric in ((Dtype.int8, True), (Dtype.uint4, False), (Dtype.fp8_e4m3, True)):
        obs = PerTensorMinMaxObserver(spec(dtype, symmetric=symmetric))
        x = torch.zeros(8)
        obs(x)
        scale, zp = obs.calculate_qparams()
        assert scale.item() > 0
        out = fake_quantize(x, scale, zp, dtype, qscheme=QSchemeType.per_tensor)
        assert torch.equal(out, x)


def test_percentile_ignores_rare_outlier():
    x = torch.cat([torch.linspace(-1, 1, 100_000), torch.tensor([50.0])])
    obs = PerTensorPercentileObserver(spec(observer=PerTensorPercentileObserver, symmetric=True))
    obs(x)
    scale, _ = obs.calculate_qparams()
    amax = scale.item() * 127.5
    assert 0.99 < amax < 1.1  # the 99.99th percentile of |x| is ~1, far from the outlier 50
    obs.percentile = 100.0
    scale, _ = obs.calculate_qparams()
    assert scale.item() * 127.5 == pytest.approx(50.0, rel=1e-3)


def test_percentile_histogram_grows_with_range():
    obs = PerTensorPercentileObserver(spec(observer=PerTensorPercentileObserver, symmetric=True))
    obs(torch.full((10,), 1.0))
    obs(torch.full((10,), 4.0))
    obs.percentile = 100.0
    scale, _ = obs.calculate_qparams()
    assert scale.item() * 127.5 == pytest.approx(4.0, rel=1e-3)
    assert float(obs.histogram.sum()) == 20


def test_mse_observer_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.randn(20_000)
    x[:5] = 40.0
    s = spec(Dtype.int4, observer=PerTensorMSEObserver, symmetric=True)
    mse_obs = PerTensorMSEObserver(s)
    mse_obs(x)
    mm_obs = PerTensorMinMaxObserver(spec(Dtype.int4, symmetric=True))
    mm_obs(x)

    def err(obs):
        scale, zp = obs.calculate_qparams()
        return ((fake_quantize(x, scale, zp, Dtype.int4, qscheme=QSchemeType.per_tensor) - x) ** 2).mean()

    assert err(mse_obs) < 0.5 * err(mm_obs)


def test_block_observer_reports_e8m0_scale():
    s = QuantizationSpec(dtype=Dtype.mx, mx_element_dtype=Dtype.fp4, qscheme=QSchemeType.per_group,
                         ch_axis=-1, group_size=32, observer_cls=PerBlockMXObserver, is_dynamic=True)
    obs = PerBlockMXObserver(s)
    x = torch.zeros(2, 64)
    x[0, 0] = 6.0  # amax 6 -> floor(log2 6) - emax(e2m1)=2 -> 2^0
    x[1, 40] = 0.75  # floor(log2 .75) = -1 -> 2^-3
    obs(x)
    scale, _ = obs.calculate_qparams()
    assert scale.shape == (2, 2)
    assert scale[0, 0].item() == 1.0
    assert scale[1, 1].item() == 2.0**-3


def test_registry_is_allow_list():
    assert set(OBSERVER_CLASSES) == {
        "PlaceholderObserver", "PerTensorMinMaxObserver", "PerChannelMinMaxObserver",
        "PerGroupMinMaxObserver", "PerBlockMXObserver", "PerTensorPercentileObserver",
        "PerTensorMSEObserver",
    }


def test_no_statistics_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no statistics"):
        PerTensorMinMaxObserver(spec()).calculate_qparams()


def test_symmetric_unsigned_uses_the_middle_code():
    obs = PerTensorMinMaxObserver(spec(Dtype.uint4, symmetric=True))
    x = torch.tensor([-3.0, 1.0, 2.0])
    obs(x)
    scale, zp = obs.calculate_qparams()
    assert zp.item() == 8 and scale.item() == pytest.approx(3.0 / 7.5)
    out = fake_quantize(x, scale, zp, Dtype.uint4, qscheme=QSchemeType.per_tensor)
    assert out[0].item() < 0  # negative values are not clipped to zero


def test_qparams_do_not_depend_on_scalar_division_rounding():
    """Scales are IEEE quotients (a reciprocal multiply would move some by one ulp)."""
    amax = torch.rand(10_000) * 5
    obs = PerChannelMinMaxObserver(spec(qscheme=QSchemeType.per_channel, observer=PerChannelMinMaxObserver,
                                        ch_axis=0, symmetric=True))
    obs(torch.stack([amax, -amax], dim=1))
    scale, _ = obs.calculate_qparams()
    exact = torch.from_numpy(amax.numpy() / amax.numpy().dtype.type(127.5))
    assert torch.equal(scale, exact)
