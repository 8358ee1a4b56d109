import pytest
import torch

from quark.torch.algorithm.utils import tokens
from quark.torch.algorithm.utils.tokens import capped_tokens


def test_massive_token_is_capped_to_ratio_times_median_peak_keeping_direction():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 9, 6, generator=g)
    x[0, 0] *= 1000.0  # an attention-sink-like token
    out = capped_tokens(x, ratio=10.0)
    peaks = x.reshape(9, 6).abs().amax(-1)
    limit = 10.0 * peaks.median()
    assert out.shape == (9, 6)
    assert torch.equal(out[1:], x.reshape(9, 6)[1:])
    assert torch.isclose(out[0].abs().max(), limit)
    cos = torch.nn.functional.cosine_similarity(out[0], x[0, 0], dim=0)
    assert cos > 1 - 1e-6


def test_no_cap_when_disabled_or_all_ordinary(monkeypatch):
    x = torch.randn(4, 5, 3)
    assert torch.equal(capped_tokens(x, ratio=1e9), x.reshape(-1, 3))
    monkeypatch.setattr(tokens, "MASSIVE_TOKEN_RATIO", None)
    y = x.clone()
    y[0, 0] *= 1e4
    assert torch.equal(capped_tokens(y), y.reshape(-1, 3))


def test_all_zero_tokens_do_not_lower_the_median():
    """Llama 4's unfused experts see the tokens not routed to them as zero rows: the cap is that of the rest."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=g)
    x[0] *= 1000.0
    padded = torch.cat([x, torch.zeros(20, 6)])
    assert torch.equal(capped_tokens(padded, ratio=10.0)[:9], capped_tokens(x, ratio=10.0))
    assert torch.equal(capped_tokens(padded, ratio=10.0)[9:], torch.zeros(20, 6))


def test_the_factors_computed_without_waiting_are_those_of_cap_factors(monkeypatch):
    """The GPU's sync-free factors: the same as :func:`tokens.cap_factors` where it caps, exactly 1 where it
    returns None (an even count's median is the lower middle value in both)."""
    g = torch.Generator().manual_seed(3)
    massive = torch.rand(12, generator=g) + 0.5
    massive[2] = 400.0
    with_zeros = torch.cat([massive, torch.zeros(5)])
    cases = [
        (massive, None),  # one massive token
        (torch.rand(8, generator=g) + 0.5, None),  # nothing to cap
        (with_zeros, None),  # zero tokens do not lower the median
        (torch.tensor([0.0, 0.0, 3.0]), None),  # fewer than two positive peaks
        (torch.zeros(4), None),
        (massive[:6], massive),  # the median of every rank's peaks
    ]
    for peak, every in cases:
        expected = tokens.cap_factors(peak, 10.0, median_of=every)
        got = tokens.cap_factors_without_waiting(peak, 10.0, median_of=every)
        assert torch.equal(got, torch.ones_like(peak) if expected is None else expected), (peak, every)
    assert tokens.cap_factors(massive, 10.0) is not None
    monkeypatch.setattr(tokens, "MASSIVE_TOKEN_RATIO", None)  # capping off
    assert tokens.cap_factors_without_waiting(massive) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capped_tokens_on_the_gpu_equal_those_on_the_cpu():
    """On a GPU the factors are computed without a synchronisation (ones where nothing is capped)."""
    g = torch.Generator().manual_seed(0)
    for massive in (True, False):
        x = torch.randn(64, 32, generator=g).to(torch.bfloat16)
        if massive:
            x[5] *= 500.0
        assert torch.equal(capped_tokens(x.cuda(), 10.0).cpu(), capped_tokens(x, 10.0)), massive
