"""Observers (layer 3): running statistics of a tensor -> ``(scale, zero_point)``.

Each observer has ``forward(x)`` (record statistics, return ``x`` unchanged),
``calculate_qparams()`` and ``reset_state()``, and never looks at modules. MinMax, Percentile and
MSE observers differ only in how a range is chosen from the statistics; the range-to-qparams
formula is shared (:func:`range_to_qparams`).

Conventions (those of Quark and ``torch.ao``):
- symmetric integer: ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)``, zero point 0 (the
  middle code, e.g. 8, for unsigned dtypes);
- asymmetric integer: the range is widened to include 0, ``scale = (max - min) / (qmax - qmin)``,
  ``zero_point = clamp(qmin - round(min / scale), qmin, qmax)``;
- scaled floats (fp8/fp6/fp4): ``scale = amax / max_finite``;
- a zero range gives ``scale = eps`` (float32 machine epsilon), never 0, so all-zero tensors
  quantize to exact zeros;
- ``ScaleType.pof2`` rounds the scale *up* to a power of two, so no in-range value clips.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from quark.torch.quantization.config.observer_registry import register_observer
from quark.torch.quantization.config.type import Dtype, QSchemeType, ScaleType, ZeroPointType
from quark.torch.quantization.formats.table import FormatInfo, format_info

if TYPE_CHECKING:
    from quark.torch.quantization.config.config import QuantizationSpec

_EPS = torch.finfo(torch.float32).eps
_SCALE_DTYPES = {
    ScaleType.float16: torch.float16,
    ScaleType.bfloat16: torch.bfloat16,
}


def _reduce_minmax(x: torch.Tensor, qscheme: QSchemeType, ch_axis: int | None,
                   group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from quark.torch.quantization.formats import reduce_minmax

    return reduce_minmax(x, qscheme, ch_axis=ch_axis, group_size=group_size)


def _div(numerator: torch.Tensor, denominator: float) -> torch.Tensor:
    """IEEE division by a constant on every device (CUDA turns division by a Python scalar into a
    reciprocal multiply, which moves some scales by one ulp and flips codes sitting on a tie)."""
    return numerator / torch.full_like(numerator, denominator)


def int_range_divisor(info: FormatInfo, *, symmetric: bool) -> float:
    """What an integer grid's range is divided by for its scale: ``(qmax - qmin) / 2`` symmetric (the range is
    ``max|x|``), else ``qmax - qmin``."""
    return (info.qmax - info.qmin) / 2 if symmetric else float(info.qmax - info.qmin)


def symmetric_zero_point(info: FormatInfo) -> float:
    """A symmetric integer grid's zero point: 0 for signed codes; unsigned codes centre the grid on the middle
    code (uint4: 8, uint8: 128)."""
    return 0.0 if info.signed else float((info.qmax + info.qmin + 1) // 2)


def range_to_qparams(min_val: torch.Tensor, max_val: torch.Tensor, info: FormatInfo, *,
                     symmetric: bool, scale_type: ScaleType = ScaleType.float,
                     zero_point_type: ZeroPointType = ZeroPointType.int32,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a (per-parameter) value range into ``(scale, zero_point)`` for ``info``'s format."""
    dtype = torch.promote_types(min_val.dtype, torch.float32)  # float64 stays float64
    min_val = min_val.to(dtype)
    max_val = max_val.to(dtype)
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    if info.kind == "int":
        if symmetric:
            amax = torch.maximum(-min_neg, max_pos)
            scale = _div(amax, int_range_divisor(info, symmetric=True))
            zero_point = torch.full_like(scale, symmetric_zero_point(info))
        else:
            scale = _div(max_pos - min_neg, int_range_divisor(info, symmetric=False))
            scale = torch.clamp(scale, min=_EPS)
            if zero_point_type == ZeroPointType.float32:
                zero_point = info.qmin - min_neg / scale
            else:
                zero_point = torch.clamp(info.qmin - torch.round(min_neg / scale), info.qmin, info.qmax)
    elif info.kind == "float":
        amax = torch.maximum(-min_neg, max_pos)
        scale = _div(amax, info.qmax)
        zero_point = torch.zeros_like(scale)
    else:
        raise ValueError(f"range_to_qparams: dtype {info.dtype.name} has no range-based scale "
                         "(cast, MX and BFP formats compute their scales per block)")
    scale = torch.clamp(scale, min=_EPS)
    if scale_type == ScaleType.pof2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
        if info.kind == "int" and not symmetric and zero_point_type == ZeroPointType.int32:
            zero_point = torch.clamp(info.qmin - torch.round(min_neg / scale), info.qmin, info.qmax)
    elif scale_type in _SCALE_DTYPES:
        scale = scale.to(_SCALE_DTYPES[scale_type])
    if zero_point_type == ZeroPointType.int32 and info.kind == "int":
        zero_point = zero_point.to(torch.int32)
    return scale, zero_point


class ObserverBase(nn.Module):
    """Base of all observers: records statistics in ``forward`` and turns them into qparams."""

    qschemes: ClassVar[tuple[QSchemeType, ...]] = ()
    kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, qspec: QuantizationSpec, device: torch.device | None = None) -> None:
        super().__init__()
        self.qspec = qspec
        self.dtype: Dtype = qspec.dtype
        self.info = format_info(qspec.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement calculate_qparams")

    def reset_state(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement reset_state")

    @property
    def has_statistics(self) -> bool:
        return True

    @property
    def merge_invariant(self) -> bool:
        """Whether observing a batch gives the statistics of observing its samples one by one.

        Then calibration may run its batches merged (``calibration/batches.py``).
        """
        return False

    # -- data-parallel calibration (``calibration/distributed.py``) ----------------------------------
    def statistics_shape(self) -> tuple | None:
        """What :meth:`empty_statistics` needs to build statistics of no data (None: nothing recorded)."""
        return None

    def empty_statistics(self, shape: tuple) -> None:
        """Statistics of no data (the identity of :meth:`reduce`), shaped as another rank's."""
        raise NotImplementedError(f"{type(self).__name__} cannot be calibrated over several ranks")

    def reduce(self, all_reduce: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
        """Combine this observer's statistics over every rank in place; ``all_reduce(tensor, op)`` with
        ``op`` in ``sum``/``min``/``max`` reduces a tensor in place over the ranks."""
        raise NotImplementedError(f"{type(self).__name__} cannot be calibrated over several ranks")

    def _qparams_from_range(self, min_val: torch.Tensor, max_val: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.qspec
        return range_to_qparams(
            min_val, max_val, self.info,
            symmetric=True if spec.symmetric is None else bool(spec.symmetric),
            scale_type=spec.scale_type or ScaleType.float,
            zero_point_type=getattr(spec, "zero_point_type", None) or ZeroPointType.int32,
        )


class PlaceholderObserver(ObserverBase):
    """Observer for plain casts (float16/bfloat16): records nothing, needs no scale."""

    qschemes = (QSchemeType.per_tensor, QSchemeType.per_channel, QSchemeType.per_group)
    kinds = ("cast",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)

    def reset_state(self) -> None:
        return None


class _MinMaxObserver(ObserverBase):
    """Running min/max at the granularity of the spec's qscheme."""

    kinds = ("int", "float")
    min_val: torch.Tensor | None
    max_val: torch.Tensor | None

    def __init__(self, qspec: QuantizationSpec, device: torch.device | None = None) -> None:
        super().__init__(qspec, device)
        self.register_buffer("min_val", None, persistent=False)
        self.register_buffer("max_val", None, persistent=False)

    def _granularity(self) -> tuple[QSchemeType, int | None, int | None]:
        return self.qscheme_for_stats, self.qspec.ch_axis, self.qspec.group_size

    qscheme_for_stats: ClassVar[QSchemeType] = QSchemeType.per_tensor

    @property
    def has_statistics(self) -> bool:
        return self.min_val is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        qscheme, ch_axis, group_size = self._granularity()
        mn, mx = _reduce_minmax(x.detach(), qscheme, ch_axis, group_size)
        mn, mx = mn.float(), mx.float()
        if self.min_val is None or self.qspec.is_dynamic:
            self.min_val, self.max_val = mn, mx
        else:
            if self.min_val.shape != mn.shape:
                raise ValueError(f"{type(self).__name__}: statistics shape changed from "
                                 f"{tuple(self.min_val.shape)} to {tuple(mn.shape)} between batches")
            self.min_val = torch.minimum(self.min_val, mn)
            self.max_val = torch.maximum(self.max_val, mx)
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_val is None or self.max_val is None:
            raise RuntimeError(f"{type(self).__name__}: no statistics recorded; run calibration data "
                               "through the model (or the tensor through the observer) first")
        return self._qparams_from_range(self.min_val, self.max_val)

    def reset_state(self) -> None:
        self.min_val = None
        self.max_val = None

    def statistics_shape(self) -> tuple | None:
        return None if self.min_val is None else ("minmax", tuple(self.min_val.shape))

    def empty_statistics(self, shape: tuple) -> None:
        self.min_val = torch.full(shape[1], float("inf"))
        self.max_val = torch.full(shape[1], float("-inf"))

    def reduce(self, all_reduce: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
        # min and max are exact in any order: the result equals one process's on all the data
        if self.min_val is not None and self.max_val is not None:
            all_reduce(self.min_val, "min")
            all_reduce(self.max_val, "max")


class PerTensorMinMaxObserver(_MinMaxObserver):
    """Running min/max over the whole tensor (one scale)."""

    qschemes = (QSchemeType.per_tensor,)
    qscheme_for_stats = QSchemeType.per_tensor

    @property
    def merge_invariant(self) -> bool:
        return True  # min and max of a union are the min and max of the parts


class PerChannelMinMaxObserver(_MinMaxObserver):
    """Running min/max per index of ``ch_axis`` (one scale per channel)."""

    qschemes = (QSchemeType.per_channel,)
    qscheme_for_stats = QSchemeType.per_channel

    @property
    def merge_invariant(self) -> bool:
        return self.qspec.ch_axis == -1  # channels along the features, not the batch


class PerGroupMinMaxObserver(_MinMaxObserver):
    """Running min/max per group of ``group_size`` consecutive elements along ``ch_axis``."""

    qschemes = (QSchemeType.per_group,)
    qscheme_for_stats = QSchemeType.per_group


class PerBlockMXObserver(ObserverBase):
    """Observer of block formats (OCP MX, MX6/MX9, BFP16).

    Block formats derive their shared exponent from each block of the tensor being quantized, so
    there is no calibrated range; ``calculate_qparams`` returns the per-block shared power-of-two
    scale of the most recently observed tensor (useful for inspection and for weights).
    """

    qschemes = (QSchemeType.per_group,)
    kinds = ("mx", "bfp")

    def __init__(self, qspec: QuantizationSpec, device: torch.device | None = None) -> None:
        super().__init__(qspec, device)
        self.register_buffer("amax", None, persistent=False)

    @property
    def has_statistics(self) -> bool:
        return self.amax is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from quark.torch.quantization.formats import reduce_amax

        self.amax = reduce_amax(x.detach().float(), QSchemeType.per_group,
                                ch_axis=self.qspec.ch_axis, group_size=self.qspec.group_size)
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.amax is None:
            raise RuntimeError("PerBlockMXObserver: no tensor observed yet")
        element = self.qspec.mx_element
        emax = format_info(element).emax if element is not None else 0
        safe = torch.where(self.amax > 0, self.amax, torch.ones_like(self.amax))
        exponent = torch.floor(torch.log2(safe)) - emax
        exponent = torch.where(self.amax > 0, exponent, torch.full_like(exponent, -127.0))
        scale = torch.exp2(torch.clamp(exponent, -127, 127))
        return scale, torch.zeros_like(scale, dtype=torch.int32)

    def reset_state(self) -> None:
        self.amax = None


class _HistogramObserver(ObserverBase):
    """Per-tensor histogram of the values seen so far, re-binned as the range grows.

    Symmetric specs histogram ``|x|`` over ``[0, amax]``; asymmetric ones histogram ``x`` over
    ``[min, max]``. Memory stays at ``bins`` counters whatever the amount of calibration data.
    """

    qschemes = (QSchemeType.per_tensor,)
    kinds = ("int", "float")
    bins: ClassVar[int] = 2048

    def __init__(self, qspec: QuantizationSpec, device: torch.device | None = None) -> None:
        super().__init__(qspec, device)
        self.symmetric = True if qspec.symmetric is None else bool(qspec.symmetric)
        self.register_buffer("histogram", None, persistent=False)
        self.lo = 0.0
        self.hi = 0.0

    @property
    def has_statistics(self) -> bool:
        return self.histogram is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        data = x.detach().float().flatten()
        if self.symmetric:
            data = data.abs()
        lo = 0.0 if self.symmetric else min(float(data.min()), 0.0)
        hi = max(float(data.max()), 0.0)
        if self.qspec.is_dynamic:
            self.histogram = None
        if self.histogram is None:
            self.lo, self.hi = lo, max(hi, lo + _EPS)
            self.histogram = torch.zeros(self.bins, dtype=torch.float64, device=data.device)
        elif lo < self.lo or hi > self.hi:
            self._rebin(min(lo, self.lo), max(hi, self.hi))
        self.histogram += torch.histc(data, bins=self.bins, min=self.lo, max=self.hi).double()
        return x

    def _rebin(self, new_lo: float, new_hi: float) -> None:
        """Spread the old bins' counts onto a wider range (counts move with their bin centres)."""
        old_hist = self._require().to(self.histogram.device) if self.histogram is not None else None
        if old_hist is None:
            return
        old_width = (self.hi - self.lo) / self.bins
        centres = self.lo + (torch.arange(self.bins, dtype=torch.float64,
                                          device=self.histogram.device) + 0.5) * old_width
        new_width = (new_hi - new_lo) / self.bins
        index = torch.clamp(((centres - new_lo) / new_width).long(), 0, self.bins - 1)
        rebinned = torch.zeros_like(old_hist)
        rebinned.index_add_(0, index, old_hist)
        self.histogram, self.lo, self.hi = rebinned, new_lo, new_hi

    def _edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def _require(self) -> torch.Tensor:
        if self.histogram is None:
            raise RuntimeError(f"{type(self).__name__}: no statistics recorded; run calibration data "
                               "through the model first")
        return self.histogram.cpu()

    def reset_state(self) -> None:
        self.histogram = None
        self.lo = self.hi = 0.0

    def statistics_shape(self) -> tuple | None:
        return None if self.histogram is None else ("histogram", self.bins)

    def empty_statistics(self, shape: tuple) -> None:
        self.histogram = torch.zeros(self.bins, dtype=torch.float64)
        self.lo, self.hi = float("inf"), float("-inf")

    def reduce(self, all_reduce: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
        """Every rank's histogram re-binned onto the union of their ranges, then summed.

        Not bit-identical to one process: there the bins are re-binned as the range grows batch by
        batch, here once per rank onto the common range (counts move with their bin centres either way).
        """
        if self.histogram is None:
            return
        bounds = torch.tensor([self.lo, -self.hi], dtype=torch.float64)
        all_reduce(bounds, "min")
        lo, hi = float(bounds[0]), -float(bounds[1])
        if self.hi < self.lo:  # no data here: zeros on the common range
            self.histogram = torch.zeros(self.bins, dtype=torch.float64, device=self.histogram.device)
            self.lo, self.hi = lo, hi
        elif lo < self.lo or hi > self.hi:
            self._rebin(lo, hi)
        all_reduce(self.histogram, "sum")


class PerTensorPercentileObserver(_HistogramObserver):
    """Range from percentiles of a running histogram, robust to rare outliers.

    ``percentile`` (default 99.99) can be set per instance (``observer.percentile = 99.9``) or on a
    subclass.
    """

    percentile: float = 99.99

    def _value_at(self, hist: torch.Tensor, fraction: float) -> float:
        cdf = torch.cumsum(hist, 0) / hist.sum()
        index = int(torch.searchsorted(cdf, torch.tensor(fraction, dtype=torch.float64)))
        index = min(index, self.bins - 1)
        return float(self._edges()[index + 1])

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self._require()
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"{type(self).__name__}.percentile={self.percentile} must be in (0, 100]")
        p = self.percentile / 100.0
        if hist.sum() == 0:
            return self._qparams_from_range(torch.tensor(0.0), torch.tensor(0.0))
        if self.symmetric:
            amax = self._value_at(hist, p)
            return self._qparams_from_range(torch.tensor(-amax), torch.tensor(amax))
        lo = float(self._edges()[0]) if p >= 1.0 else self._value_at(hist, 1.0 - p)
        hi = self._value_at(hist, p)
        return self._qparams_from_range(torch.tensor(min(lo, 0.0)), torch.tensor(hi))


class PerTensorMSEObserver(_HistogramObserver):
    """Range whose quantization error (expected over the histogram) is smallest.

    Candidate ranges shrink the observed range by factors in ``[min_ratio, 1]`` (``steps`` of
    them); each is scored by the mean squared error of fake-quantizing the histogram's bin centres,
    weighted by their counts, in the spec's own format.
    """

    steps: ClassVar[int] = 100
    min_ratio: ClassVar[float] = 0.2

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        from quark.torch.quantization.formats import fake_quantize

        hist = self._require()
        edges = self._edges()
        centres = ((edges[:-1] + edges[1:]) / 2).float()
        weights = hist.float()
        if hist.sum() == 0:
            return self._qparams_from_range(torch.tensor(0.0), torch.tensor(0.0))
        # Evaluate on signed values so asymmetric grids are scored correctly.
        best: tuple[float, tuple[torch.Tensor, torch.Tensor]] | None = None
        for ratio in torch.linspace(self.min_ratio, 1.0, self.steps).tolist():
            if self.symmetric:
                hi = self.hi * ratio
                scale, zp = self._qparams_from_range(torch.tensor(-hi), torch.tensor(hi))
            else:
                scale, zp = self._qparams_from_range(torch.tensor(min(self.lo, 0.0) * ratio),
                                                     torch.tensor(self.hi * ratio))
            fq = fake_quantize(centres, scale.float(), zp, self.dtype, qscheme=QSchemeType.per_tensor,
                               round_method=self.qspec.round_method)
            err = float((weights * (fq - centres) ** 2).sum())
            if best is None or err < best[0] - 1e-12 * max(1.0, abs(best[0])):
                best = (err, (scale, zp))
        return best[1] if best is not None else self._qparams_from_range(torch.tensor(0.0),
                                                                         torch.tensor(0.0))


OBSERVER_CLASSES: dict[str, type[ObserverBase]] = {
    cls.__name__: cls
    for cls in (
        PlaceholderObserver,
        PerTensorMinMaxObserver,
        PerChannelMinMaxObserver,
        PerGroupMinMaxObserver,
        PerBlockMXObserver,
        PerTensorPercentileObserver,
        PerTensorMSEObserver,
    )
}
for _observer in OBSERVER_CLASSES.values():
    register_observer(_observer)


def observer_class(name: str) -> type[ObserverBase]:
    """Resolve an observer class by name from the allow-list (never imports arbitrary paths)."""
    try:
        return OBSERVER_CLASSES[name]
    except KeyError:
        raise ValueError(f"observer_cls={name!r} is not one of: {', '.join(OBSERVER_CLASSES)}") from None


def default_observer_for(dtype: Dtype, qscheme: QSchemeType | None) -> type[ObserverBase]:
    """The observer a spec gets when ``observer_cls`` is not given."""
    kind = format_info(dtype).kind
    if kind == "cast":
        return PlaceholderObserver
    if kind in ("mx", "bfp"):
        return PerBlockMXObserver
    if qscheme == QSchemeType.per_channel:
        return PerChannelMinMaxObserver
    if qscheme == QSchemeType.per_group:
        return PerGroupMinMaxObserver
    return PerTensorMinMaxObserver


__all__ = [
    "OBSERVER_CLASSES",
    "ObserverBase",
    "PerBlockMXObserver",
    "PerChannelMinMaxObserver",
    "PerGroupMinMaxObserver",
    "PerTensorMSEObserver",
    "PerTensorMinMaxObserver",
    "PerTensorPercentileObserver",
    "PlaceholderObserver",
    "default_observer_for",
    "observer_class",
    "range_to_qparams",
]
