"""Weight grids used inside the algorithms' searches (AWQ, GPTQ, AutoSmoothQuant).

Conventions (the Quark ones, see ``reference/quark-hf-format.md``): ``q = clamp(round(x * (1 / s)) + zp,
qmin, qmax)`` (``formats.divide_by_scale``, the quantizers' own division mode) and
``x_hat = (q - zp) * s``; ``qmin``/``qmax`` come from the format table. FP8 grids (GPTQ only) are
``x_hat = fp8(clamp(x / s, -max, max)) * s``, the native cast rounding.
Min-max parameters follow torch's observer rule: symmetric ``s = amax / ((qmax - qmin) / 2)``,
``zp = 0``; asymmetric ``s = (max+ - min-) / (qmax - qmin)``, ``zp = qmin - round(min- / s)``
with ``min- = min(x, 0)``, ``max+ = max(x, 0)``.

A weight is ``[out, in]``: per-channel parameters have shape ``[out]`` (``ch_axis=0``), per-group
ones ``[out, in // group]`` (groups along the input dimension, ``ch_axis`` 1 or -1), per-tensor
ones a scalar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType
from quark.torch.quantization.formats.affine import divide_by_scale, fake_quantize_broadcast
from quark.torch.quantization.formats.table import FORMATS
from quark.torch.quantization.observer.observer import range_to_qparams


@dataclass(frozen=True)
class WeightGrid:
    """The parts of a ``QuantizationSpec`` a weight search needs (integer or FP8 grid)."""

    dtype: Dtype
    qscheme: QSchemeType
    group_size: int  # columns per group; the whole row for per-channel and per-tensor
    symmetric: bool
    round_method: RoundType

    @property
    def is_float(self) -> bool:
        return FORMATS[self.dtype].kind == "float"

    @property
    def qmin(self) -> float:
        return float(FORMATS[self.dtype].qmin) if self.is_float else int(FORMATS[self.dtype].qmin)

    @property
    def qmax(self) -> float:
        return float(FORMATS[self.dtype].qmax) if self.is_float else int(FORMATS[self.dtype].qmax)


INT_DTYPES = (Dtype.int4, Dtype.uint4, Dtype.int8, Dtype.uint8)
FP8_DTYPES = (Dtype.fp8_e4m3, Dtype.fp8_e5m2)


def weight_grid_from_spec(
    spec: Any, owner: str, in_features: int, allowed: tuple[QSchemeType, ...] = (QSchemeType.per_group,
                                                                              QSchemeType.per_channel),
    dtypes: tuple[Dtype, ...] = INT_DTYPES,
) -> WeightGrid:
    """Validate a weight spec for a weight algorithm and return its grid, or raise ValueError."""
    if spec is None:
        raise ValueError(f"{owner}: the layer has no weight quantization spec; the algorithm needs one")
    dtype = Dtype.from_any("QuantizationSpec", "dtype", spec.dtype)
    if dtype not in dtypes:
        raise ValueError(f"{owner}: weight dtype={dtype.name} is not supported; allowed: "
                         + ", ".join(d.name for d in dtypes))
    qscheme = QSchemeType.from_any("QuantizationSpec", "qscheme", spec.qscheme)
    if qscheme not in allowed:
        raise ValueError(f"{owner}: weight qscheme={qscheme.name} is not supported; allowed: "
                         + ", ".join(q.name for q in allowed))
    if qscheme == QSchemeType.per_group:
        group = getattr(spec, "group_size", None)
        if not isinstance(group, int) or group <= 0 or in_features % group != 0:
            raise ValueError(f"{owner}: weight group_size={group!r} must be a positive divisor of the "
                             f"layer's in_features={in_features}")
        ch_axis = getattr(spec, "ch_axis", -1)
        if ch_axis not in (1, -1, None):
            raise ValueError(f"{owner}: per_group weight ch_axis={ch_axis!r} is not supported; allowed: 1, -1")
    elif qscheme == QSchemeType.per_channel:
        group = in_features
        ch_axis = getattr(spec, "ch_axis", 0)
        if ch_axis not in (0, None):
            raise ValueError(f"{owner}: per_channel weight ch_axis={ch_axis!r} is not supported; allowed: 0")
    else:
        group = in_features
    rnd = getattr(spec, "round_method", None)
    round_method = RoundType.half_even if rnd is None else RoundType.from_any("QuantizationSpec", "round_method", rnd)
    symmetric = bool(getattr(spec, "symmetric", True))
    return WeightGrid(dtype, qscheme, group, symmetric, round_method)


def round_to_grid(x: torch.Tensor, method: RoundType) -> torch.Tensor:
    """Round with the spec's method: half away from zero, floor, or half to even."""
    if method == RoundType.round:
        return torch.sign(x) * torch.floor(x.abs() + 0.5)
    if method == RoundType.floor:
        return torch.floor(x)
    return torch.round(x)


def minmax_qparams(xmin: torch.Tensor, xmax: torch.Tensor, grid: WeightGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (float-valued) integer zero point from per-group minima and maxima.

    The formula is the observers' one (:func:`range_to_qparams`), so a search scores exactly the
    grid the quantizer will use.
    """
    scale, zp = range_to_qparams(xmin, xmax, FORMATS[grid.dtype], symmetric=grid.symmetric)
    return scale, zp.to(scale.dtype)


def weight_qparams(w: torch.Tensor, grid: WeightGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max qparams of a ``[out, in]`` weight: shape ``[out]`` (per-channel) or ``[out, G]``."""
    out, inp = w.shape
    g = w.reshape(out, inp // grid.group_size, grid.group_size).float()
    scale, zp = minmax_qparams(g.amin(-1), g.amax(-1), grid)
    if grid.qscheme == QSchemeType.per_channel:
        return scale[:, 0], zp[:, 0]
    return scale, zp


def fake_quant_with(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """Quantize-dequantize ``x`` with parameters broadcastable to it."""
    if grid.is_float:  # the quantizer's own FP8 arithmetic (float32, native cast)
        return fake_quantize_broadcast(x, scale, None, grid.dtype)
    xf = x if x.dtype == torch.float64 else x.float()
    if grid.symmetric and grid.qmin < 0:  # signed symmetric grids have zero point 0 (range_to_qparams)
        return (round_to_grid(divide_by_scale(xf, scale), grid.round_method).clamp(grid.qmin, grid.qmax)
                * scale).to(x.dtype)
    q = (round_to_grid(divide_by_scale(xf, scale), grid.round_method) + zp).clamp(grid.qmin, grid.qmax)
    return ((q - zp) * scale).to(x.dtype)


def fake_quant_weight(w: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """Round-to-nearest fake quantization of a ``[out, in]`` weight with min-max parameters."""
    out, inp = w.shape
    scale, zp = weight_qparams(w, grid)
    if grid.qscheme == QSchemeType.per_channel:
        return fake_quant_with(w, scale[:, None], zp[:, None], grid)
    g = w.reshape(out, inp // grid.group_size, grid.group_size)
    return fake_quant_with(g, scale[..., None], zp[..., None], grid).reshape(out, inp)


def simulate_quant(x: torch.Tensor, spec: Any) -> torch.Tensor:
    """Fake-quantize ``x`` with min-max parameters taken from ``x`` itself (used inside searches).

    Integer dtypes are handled here (per-tensor, per-channel along ``ch_axis``, per-group along
    the last axis); every other dtype goes through the quantizer layer's
    ``fake_quantize_with_spec``. ``None`` means not quantized.
    """
    if spec is None:
        return x
    dtype = Dtype.from_any("QuantizationSpec", "dtype", spec.dtype)
    if dtype not in FORMATS or FORMATS[dtype].kind != "int":
        from quark.torch.quantization.tensor_quantize import fake_quantize_with_spec

        return fake_quantize_with_spec(x, spec)
    qscheme = QSchemeType.from_any("QuantizationSpec", "qscheme", spec.qscheme)
    rnd = getattr(spec, "round_method", None)
    grid = WeightGrid(dtype, qscheme, 0, bool(getattr(spec, "symmetric", True)),
                   RoundType.half_even if rnd is None else RoundType.from_any("QuantizationSpec", "round_method", rnd))
    if qscheme == QSchemeType.per_tensor:
        scale, zp = minmax_qparams(x.min().float(), x.max().float(), grid)
        return fake_quant_with(x, scale, zp, grid)
    if qscheme == QSchemeType.per_channel:
        axis = getattr(spec, "ch_axis", 0) or 0
        xt = x.movedim(axis, 0)
        flat = xt.reshape(xt.shape[0], -1).float()
        scale, zp = minmax_qparams(flat.amin(1), flat.amax(1), grid)
        shape = (-1,) + (1,) * (xt.dim() - 1)
        return fake_quant_with(xt, scale.view(shape), zp.view(shape), grid).movedim(0, axis)
    group = int(spec.group_size)
    g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    scale, zp = minmax_qparams(g.amin(-1).float(), g.amax(-1).float(), grid)
    return fake_quant_with(g, scale[..., None], zp[..., None], grid).reshape(x.shape)
