"""Weight grids used inside the algorithms' searches (AWQ, GPTQ, AutoSmoothQuant).

Conventions (the Quark ones, see ``reference/quark-hf-format.md``): ``q = clamp(round(x * (1 / s)) + zp,
qmin, qmax)`` (``formats.divide_by_scale``, the quantizers' own division mode) and
``x_hat = (q - zp) * s``; ``qmin``/``qmax`` come from the format table. Float grids (fp8, and fp6/fp4
with a scale) are ``x_hat = fp(clamp(x / s, -max, max)) * s``, the
formats' own rounding.

Block formats have no stored parameters: OCP MX (a shared E8M0 exponent per block) and BFP16 /
MX6 / MX9 (a shared exponent per block, MX6/MX9 a micro-exponent per pair) derive every element's
power-of-two scale from the block itself. Inside a search they are a *per-column* scale (each
element's power of two, :func:`block_element_scales`) and an element grid: the MX element format
(fp8/fp6/fp4; MXINT8 as integers ``[-127, 127]`` with the ``2^-6`` folded into the scale) or the
BFP sign-magnitude integers ``[-(2^m - 1), 2^m - 1]``. ``fake_quant_weight`` of a block format is
the formats' function itself; GPTQ fixes a block's scales from its weights and rounds column by
column on them (:mod:`quark.torch.algorithm.gptq.math`).

Two-stage specs (e.g. fp4 per group whose scales are fp8 per tensor) quantize the first stage's
scales with the second stage's min-max per-tensor grid, as ``FakeQuantize``'s scale quantizer does
(:func:`second_stage_scales`).
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

from quark.torch.quantization.config.type import Dtype, QSchemeType, RoundType, ScaleType
from quark.torch.quantization.formats.affine import divide_by_scale, fake_quantize_broadcast
from quark.torch.quantization.formats.bfp import _quantize_core as _bfp_core
from quark.torch.quantization.formats.mx import _scales as _mx_scales
from quark.torch.quantization.formats.table import FORMATS, MX_ELEMENT_DTYPES
from quark.torch.quantization.observer.observer import range_to_qparams

_MXINT8_SCALE = 2.0 ** -6  # MXINT8 element value = int8 * 2^-6 (OCP MX v1.0)


@dataclass(frozen=True)
class WeightGrid:
    """The parts of a ``QuantizationSpec`` a weight search needs.

    ``kind`` is the spec's format kind: ``"int"``, ``"float"`` (a scaled fp8/fp6/fp4 grid), ``"mx"``
    (OCP MX, element ``element``, shared exponent rounded per ``scale_mode``) or ``"bfp"``
    (BFP16/MX6/MX9). ``scale_dtype`` is the second stage's dtype of a two-stage spec (its scales
    quantized per tensor), else None.
    """

    dtype: Dtype
    qscheme: QSchemeType
    group_size: int  # columns per group (per block); the whole row for per-channel and per-tensor
    symmetric: bool
    round_method: RoundType
    kind: str = ""  # "" = the dtype's own kind (int or float)
    element: Dtype | None = None
    scale_mode: str = "floor"
    scale_type: ScaleType = ScaleType.float
    scale_dtype: Dtype | None = None

    @property
    def format_kind(self) -> str:
        return self.kind or FORMATS[self.dtype].kind

    @property
    def is_block(self) -> bool:
        """Block formats: every element's scale comes from its block, no parameters are stored."""
        return self.format_kind in ("mx", "bfp")

    @property
    def element_dtype(self) -> Dtype | None:
        """The float format the (scaled) elements are rounded to, or None for an integer grid."""
        if self.format_kind == "mx":
            return None if self.element == Dtype.int8 else self.element
        return self.dtype if self.format_kind == "float" else None

    @property
    def is_float(self) -> bool:
        return self.element_dtype is not None

    @property
    def qmin(self) -> float:
        return -self.qmax if self.is_block else self._bound(FORMATS[self.dtype].qmin)

    @property
    def qmax(self) -> float:
        if self.format_kind == "mx":
            return float(FORMATS[self.element].qmax) if self.is_float else 127  # type: ignore[index]
        return self._bound(FORMATS[self.dtype].qmax)

    def _bound(self, value: float) -> float:
        return float(value) if self.is_float else int(value)

    @property
    def zero_point_free(self) -> bool:
        """Signed symmetric grids (block formats included) have zero point 0: no zero point to add."""
        return self.symmetric and self.qmin < 0

    @property
    def graph_safe(self) -> bool:
        """Grids whose column loop GPTQ captures as a CUDA graph (the others run eagerly)."""
        return not self.is_block and (self.format_kind == "int" or self.dtype in FP8_DTYPES)


INT_DTYPES = (Dtype.int4, Dtype.uint4, Dtype.int8, Dtype.uint8)
FP8_DTYPES = (Dtype.fp8_e4m3, Dtype.fp8_e5m2)
#: Every weight format a search can round to: integers, scaled floats, OCP MX, BFP16/MX6/MX9.
ALL_WEIGHT_DTYPES = (*INT_DTYPES, *FP8_DTYPES, Dtype.fp6_e3m2, Dtype.fp6_e2m3, Dtype.fp4, Dtype.mx,
                     Dtype.bfp16, Dtype.mx6, Dtype.mx9)
ALL_QSCHEMES = (QSchemeType.per_group, QSchemeType.per_channel, QSchemeType.per_tensor)


def weight_grid_from_spec(
    spec: Any, owner: str, in_features: int, allowed: tuple[QSchemeType, ...] = (QSchemeType.per_group,
                                                                              QSchemeType.per_channel),
    dtypes: tuple[Dtype, ...] = INT_DTYPES,
) -> WeightGrid:
    """Validate a weight spec (or a two-stage ``[element, scale]`` spec list) for a weight algorithm
    and return its grid, or raise ValueError naming the field and the allowed values."""
    if spec is None:
        raise ValueError(f"{owner}: the layer has no weight quantization spec; the algorithm needs one")
    second = None
    if isinstance(spec, (list, tuple)):
        if len(spec) != 2:
            raise ValueError(f"{owner}: a multi-stage weight spec must have exactly 2 stages, got {len(spec)}")
        spec, second = spec
    dtype = Dtype.from_any("QuantizationSpec", "dtype", spec.dtype)
    kind = getattr(spec, "kind", None) or FORMATS[dtype].kind
    if kind == "cast":
        raise ValueError(f"{owner}: weight dtype={dtype.name} is a plain cast with no grid parameters or "
                         "rounding choices for the algorithm to optimise; use a quantized weight format")
    if dtype not in dtypes:
        raise ValueError(f"{owner}: weight dtype={dtype.name} is not supported; allowed: "
                         + ", ".join(d.name for d in dtypes))
    if kind in ("mx", "bfp"):
        return _block_grid(spec, dtype, kind, owner, in_features, second)
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
    scale_type = _scale_type(spec, owner)
    scale_dtype = None if second is None else _second_stage_dtype(second, owner)
    if scale_dtype is not None and qscheme == QSchemeType.per_tensor:
        raise ValueError(f"{owner}: a two-stage weight spec with a per_tensor first stage has a single scale; "
                         "quantizing it again is meaningless (use a per_group or per_channel first stage)")
    return WeightGrid(dtype, qscheme, group, symmetric, round_method, kind=kind, scale_type=scale_type,
                      scale_dtype=scale_dtype)


def _scale_type(spec: Any, owner: str) -> ScaleType:
    value = getattr(spec, "scale_type", None)
    scale_type = ScaleType.float if value is None else ScaleType.from_any("QuantizationSpec", "scale_type", value)
    if scale_type not in (ScaleType.float, ScaleType.pof2):
        raise ValueError(f"{owner}: weight scale_type={scale_type.name} is not supported by the weight "
                         "algorithms; allowed: float, pof2")
    return scale_type


def _second_stage_dtype(second: Any, owner: str) -> Dtype:
    """The scale stage of a two-stage spec: a static per-tensor int or float grid (its min-max scale)."""
    dtype = Dtype.from_any("QuantizationSpec", "dtype", second.dtype)
    kind = getattr(second, "kind", None) or FORMATS[dtype].kind
    qscheme = QSchemeType.from_any("QuantizationSpec", "qscheme", second.qscheme or QSchemeType.per_tensor)
    if kind not in ("int", "float") or qscheme != QSchemeType.per_tensor or bool(getattr(second, "is_dynamic", False)):
        raise ValueError(f"{owner}: the scale stage of a two-stage weight spec (dtype={dtype.name}, "
                         f"qscheme={qscheme.name}) is not supported; allowed: a static per_tensor int or float "
                         "grid (e.g. fp8_e4m3)")
    if kind == "int" and not bool(getattr(second, "symmetric", True)):
        raise ValueError(f"{owner}: the scale stage of a two-stage weight spec must be symmetric")
    return dtype


def _block_grid(spec: Any, dtype: Dtype, kind: str, owner: str, in_features: int, second: Any) -> WeightGrid:
    """The grid of an OCP MX or BFP16/MX6/MX9 weight spec (blocks along the input dimension)."""
    if second is not None:
        raise ValueError(f"{owner}: a two-stage spec whose first stage is the block format {dtype.name} is "
                         "meaningless: its shared exponents are already 8-bit powers of two, with nothing "
                         "left for a scale stage to quantize")
    ch_axis = getattr(spec, "ch_axis", None)
    if ch_axis not in (1, -1, None):
        raise ValueError(f"{owner}: {dtype.name} weight blocks along ch_axis={ch_axis!r} are not supported; "
                         "allowed: 1, -1 (blocks along the input features)")
    if kind == "mx":
        element = getattr(spec, "mx_element", None)
        if element not in MX_ELEMENT_DTYPES:
            raise ValueError(f"{owner}: MX weight element dtype={element!r} is not one of: "
                             + ", ".join(d.name for d in MX_ELEMENT_DTYPES))
        block = getattr(spec, "group_size", None) or 32
        scale_mode = getattr(spec, "mx_scale_mode", None) or "floor"
    else:
        element, scale_mode = None, "floor"
        info = FORMATS[dtype]
        block = getattr(spec, "group_size", None) or info.block_size
        if info.sub_block_size and block % info.sub_block_size:
            raise ValueError(f"{owner}: {dtype.name} weight group_size={block} must be a multiple of its "
                             f"micro-exponent pair size {info.sub_block_size}")
    if in_features % block != 0:
        raise ValueError(f"{owner}: {dtype.name} weight block size (group_size) {block} must divide the layer's "
                         f"in_features={in_features}")
    return WeightGrid(dtype, QSchemeType.per_group, block, True, RoundType.half_even, kind=kind, element=element,
                      scale_mode=scale_mode)


def block_element_scales(w: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """Each element's power-of-two scale (float32, ``w``'s shape ``[..., in]``) under a block format.

    Blocks run along the last axis; ``fake_quant_with(w, scales, 0, grid)`` then equals the
    formats' own fake quantization of ``w``.
    """
    info = FORMATS[grid.dtype] if grid.format_kind == "bfp" else FORMATS[grid.element]  # type: ignore[index]
    if grid.format_kind == "bfp":
        return _bfp_core(w, info, -1, grid.group_size)[3]
    scales = _mx_scales(w.float(), info, -1, grid.group_size, grid.scale_mode)[1]
    return scales * _MXINT8_SCALE if grid.element == Dtype.int8 else scales


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
    grid the quantizer will use. The scales of a two-stage grid are *not* quantized here
    (:func:`second_stage_scales`).
    """
    scale, zp = range_to_qparams(xmin, xmax, FORMATS[grid.dtype], symmetric=grid.symmetric,
                                 scale_type=grid.scale_type)
    return scale, zp.to(scale.dtype)


def second_stage_scales(scale: torch.Tensor, grid: WeightGrid, scale2: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(quantized scales, the scale stage's per-tensor scale)``; unchanged and None for one stage.

    As ``FakeQuantize``'s scale quantizer: a min-max per-tensor grid of ``grid.scale_dtype`` over
    all of the first stage's scales (or the given ``scale2``), then the scales fake-quantized on it.
    """
    if grid.scale_dtype is None:
        return scale, None
    info = FORMATS[grid.scale_dtype]
    computed, zp2 = range_to_qparams(scale.min(), scale.max(), info, symmetric=True)
    scale2 = computed if scale2 is None else scale2
    zp = None if info.kind == "float" else zp2.to(torch.float32)
    return fake_quantize_broadcast(scale, scale2, zp, grid.scale_dtype).to(scale.dtype), scale2


def stage_two_scale(w: torch.Tensor, grid: WeightGrid) -> torch.Tensor | None:
    """The scale stage's per-tensor scale for weight ``w [out, in]`` (None for a one-stage grid)."""
    if grid.scale_dtype is None:
        return None
    return weight_qparams(w, grid, with_scale2=True)[2]


def weight_qparams(w: torch.Tensor, grid: WeightGrid, scale2: torch.Tensor | None = None,
                   with_scale2: bool = False) -> Any:
    """Min-max qparams of a ``[out, in]`` weight: shape ``[out]`` (per-channel), ``[out, G]`` or ``[]``.

    Scales of a two-stage grid come back quantized by its scale stage (on ``scale2`` when given);
    ``with_scale2`` appends the stage's per-tensor scale (None for one stage) to the tuple.
    """
    out, inp = w.shape
    if grid.qscheme == QSchemeType.per_tensor:
        wf = w.float()
        scale, zp = minmax_qparams(wf.min(), wf.max(), grid)
        return (scale, zp, None) if with_scale2 else (scale, zp)
    g = w.reshape(out, inp // grid.group_size, grid.group_size).float()
    scale, zp = minmax_qparams(g.amin(-1), g.amax(-1), grid)
    scale, scale2 = second_stage_scales(scale, grid, scale2)
    if grid.qscheme == QSchemeType.per_channel:
        scale, zp = scale[:, 0], zp[:, 0]
    return (scale, zp, scale2) if with_scale2 else (scale, zp)


def fake_quant_with(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """Quantize-dequantize ``x`` with parameters broadcastable to it (block formats: zp unused)."""
    element = grid.element_dtype
    if element is not None:  # the formats' own float arithmetic (float32, native cast for fp8)
        return fake_quantize_broadcast(x, scale, None, element)
    xf = x if x.dtype == torch.float64 else x.float()
    if grid.is_block or grid.zero_point_free:
        return (round_to_grid(divide_by_scale(xf, scale), grid.round_method).clamp(grid.qmin, grid.qmax)
                * scale).to(x.dtype)
    q = (round_to_grid(divide_by_scale(xf, scale), grid.round_method) + zp).clamp(grid.qmin, grid.qmax)
    return ((q - zp) * scale).to(x.dtype)


def fake_quant_weight(w: torch.Tensor, grid: WeightGrid, scale2: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest fake quantization of a ``[out, in]`` weight as its quantizer does it.

    Min-max parameters (the scales of a two-stage grid quantized by its scale stage, on ``scale2``
    when given: a search that quantizes rows of a weight keeps the whole weight's); block formats
    round every element on its own block's power of two.
    """
    out, inp = w.shape
    if grid.is_block:
        zero = torch.zeros((), device=w.device)
        return fake_quant_with(w, block_element_scales(w, grid), zero, grid)
    scale, zp = weight_qparams(w, grid, scale2)
    if grid.qscheme == QSchemeType.per_tensor:
        return fake_quant_with(w, scale, zp, grid)
    if grid.qscheme == QSchemeType.per_channel:
        return fake_quant_with(w, scale[:, None], zp[:, None], grid)
    g = w.reshape(out, inp // grid.group_size, grid.group_size)
    return fake_quant_with(g, scale[..., None], zp[..., None], grid).reshape(out, inp)


def simulate_quant(x: torch.Tensor, spec: Any) -> torch.Tensor:
    """Fake-quantize ``x`` with min-max parameters taken from ``x`` itself (used inside searches).

    Integer dtypes are handled here (per-tensor, per-channel along ``ch_axis``, per-group along
    the last axis); every other dtype goes through the quantizer layer's
    ``fake_quantize_with_spec``, and a two-stage spec list through a ``FakeQuantize`` calibrated on
    ``x``. ``None`` means not quantized.
    """
    if spec is None:
        return x
    if isinstance(spec, (list, tuple)):  # two stages: the quantizer's own, its scales through the scale stage
        from quark.torch.quantization.tensor_quantize import FakeQuantize

        quantizer = FakeQuantize(spec)
        quantizer.calibrate_from(x)
        return quantizer(x)
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
