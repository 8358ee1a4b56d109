"""Parameter shapes, reductions and broadcasting per qscheme (incl. negative axes, partial groups)."""

from __future__ import annotations

import math

import pytest
import torch

from quark.torch.quantization.formats import broadcast_param, param_shape, reduce_amax, reduce_minmax
from quark.torch.quantization.formats.granularity import grouped_view, normalize_axis


def test_param_shapes() -> None:
    assert param_shape((4, 172), "per_tensor") == ()
    assert param_shape((4, 172), "per_channel", ch_axis=0) == (4,)
    assert param_shape((4, 172), "per_channel", ch_axis=-1) == (172,)
    assert param_shape((4, 172), "per_group", ch_axis=-1, group_size=32) == (4, 6)
    assert param_shape((2, 3, 64), "per_group", ch_axis=1, group_size=2) == (2, 2, 64)
    assert param_shape((2, 3, 64), "per_group", ch_axis=-3, group_size=128) == (1, 3, 64)


def _groups(x: torch.Tensor, axis: int, g: int) -> list[tuple[int, torch.Tensor]]:
    n = x.shape[axis]
    return [(j, x.narrow(axis, j * g, min(g, n - j * g))) for j in range(math.ceil(n / g))]


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
def test_reductions_per_channel(axis: int) -> None:
    x = torch.randn(3, 5, 7)
    lo, hi = reduce_minmax(x, "per_channel", ch_axis=axis)
    amax = reduce_amax(x, "per_channel", ch_axis=axis)
    for c in range(x.shape[axis]):
        sl = x.select(axis, c)
        assert lo[c] == sl.min() and hi[c] == sl.max() and amax[c] == sl.abs().max()


@pytest.mark.parametrize("axis, g", [(-1, 32), (1, 32), (0, 2), (-1, 172), (-1, 500)])
def test_reductions_per_group_with_partial_group(axis: int, g: int) -> None:
    # All-negative data: a zero padding value would wrongly win the max of a partial group.
    x = -torch.rand(3, 172) - 0.5
    lo, hi = reduce_minmax(x, "per_group", ch_axis=axis, group_size=g)
    amax = reduce_amax(x, "per_group", ch_axis=axis, group_size=g)
    assert lo.shape == hi.shape == amax.shape == param_shape(x.shape, "per_group", axis, g)
    for j, grp in _groups(x, axis, g):
        other = 1 - (axis % 2)
        for r in range(x.shape[other]):
            vals = grp.select(other, r)
            idx = (r, j) if axis % 2 == 1 else (j, r)
            assert lo[idx] == vals.min() and hi[idx] == vals.max() and amax[idx] == vals.abs().max()


def test_reductions_per_tensor_and_nan() -> None:
    x = torch.tensor([[1.0, -3.0], [2.0, 0.5]])
    lo, hi = reduce_minmax(x, "per_tensor")
    assert lo.shape == () and lo.item() == -3.0 and hi.item() == 2.0
    assert reduce_amax(x, "per_tensor").item() == 3.0
    x[0, 1] = float("nan")
    assert torch.isnan(reduce_amax(x, "per_group", ch_axis=1, group_size=2)[0, 0])


def test_broadcast_param_per_group_partial() -> None:
    shape = (2, 172)
    p = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    full = broadcast_param(p, shape, "per_group", ch_axis=-1, group_size=32)
    assert full.shape == shape
    for k in range(172):
        assert torch.equal(full[:, k], p[:, k // 32])


def test_broadcast_param_channel_and_tensor() -> None:
    p = torch.tensor([1.0, 2.0, 3.0])
    full = broadcast_param(p, (2, 3, 4), "per_channel", ch_axis=-2)
    assert torch.equal(full[1, :, 2], p)
    assert broadcast_param(torch.tensor([5.0]), (2, 3), "per_tensor").eq(5.0).all()


def test_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="qscheme"):
        param_shape((2, 3), "per_row")
    with pytest.raises(ValueError, match="ch_axis"):
        param_shape((2, 3), "per_channel")
    with pytest.raises(ValueError, match="ch_axis"):
        param_shape((2, 3), "per_channel", ch_axis=2)
    with pytest.raises(ValueError, match="group_size"):
        param_shape((2, 3), "per_group", ch_axis=1, group_size=0)
    with pytest.raises(ValueError, match="must have shape"):
        broadcast_param(torch.zeros(6, 2), (2, 172), "per_group", ch_axis=-1, group_size=32)
    with pytest.raises(ValueError, match="one element"):
        broadcast_param(torch.zeros(2), (2, 3), "per_tensor")


@pytest.mark.parametrize(("shape", "axis", "g"), [((6, 64), -1, 16), ((6, 64), 1, 32), ((32, 5), 0, 8),
                                                   ((3, 24, 4), 1, 8), ((6, 60), -1, 16)])
def test_grouped_parameters_equal_parameters_copied_to_every_element(shape, axis, g) -> None:
    """quantize / dequantize / fake_quantize view per-group tensors as [..., groups, group, ...] against each
    group's parameter once (no per-element copy): the same codes and values as with the parameters broadcast to
    every element (a partial last group, 60 = 3 x 16 + 12, keeps the per-element path)."""
    from quark.torch.quantization.formats.affine import dequantize, fake_quantize, quantize

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(torch.bfloat16)
    pshape = param_shape(shape, "per_group", axis, g)
    scale = torch.rand(pshape, generator=gen) * 0.2 + 0.01
    zero = torch.randint(0, 16, pshape, generator=gen).float()
    grid = dict(qscheme="per_group", ch_axis=axis, group_size=g)
    s = broadcast_param(scale, shape, "per_group", axis, g)
    z = broadcast_param(zero, shape, "per_group", axis, g)
    expected = (torch.round(x.float() * torch.reciprocal(s)) + z).clamp(0, 15) + 0.0  # uint4, half to even
    codes = quantize(x, scale, zero, "uint4", **grid)
    assert codes.shape == x.shape and torch.equal(codes.float(), expected)
    assert torch.equal(dequantize(codes, scale, zero, "uint4", **grid), (expected - z) * s)
    assert torch.equal(fake_quantize(x, scale, zero, "uint4", **grid), ((expected - z) * s).to(x.dtype))
    if grouped_view(shape, "per_group", axis, g) is None:
        assert shape[normalize_axis(axis, len(shape))] % g
