"""Quantizers (layer 4): ``FakeQuantize`` = a spec + an observer + a numeric format.

States of a :class:`FakeQuantize`:

- *observing* (static specs before calibration ends): the observer records statistics and the
  input passes through unchanged, so calibration sees the statistics of the real activations;
- *quantizing*: the tensor is fake-quantized with fixed ``scale``/``zero_point`` buffers;
- *dynamic* specs compute their qparams from every input; block formats (MX, MX6/MX9, BFP16)
  and casts need no calibrated qparams at all.

Every format follows one rule (:func:`check_finite`): a weight or calibration tensor holding NaN
or Inf, a non-finite scale or zero point (calibrated, set by an algorithm, or computed per input
by a dynamic spec) and a block-format input holding NaN or Inf raise
:class:`NonFiniteTensorError` naming the quantizer, instead of producing NaN outputs or codes.

A two-stage spec (a list ``[element_spec, scale_spec]``, e.g. fp4 per-group with its scales in
fp8 per-tensor) quantizes the first stage's scales with a second, nested quantizer
(``scale_quantizer``, a :class:`SecondStageQuantize`). The second stage holds no buffers: its
qparams are the buffers ``scale_2`` / ``zero_point_2`` of the first stage, or, once
:meth:`FakeQuantize.store_second_stage_on` moved them, ``{prefix}scale_2`` / ``{prefix}zero_point_2``
of another module. ``QuantLinear`` keeps them as ``weight_scale_2`` / ``input_scale_2``: the
checkpoint names, which transformers' quark integration assigns unchanged (its key renaming stops
at name boundaries, so ``weight_scale_2`` is not renamed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from quark.torch.quantization import formats
from quark.torch.quantization.config.type import QSchemeType, RoundType
from quark.torch.quantization.formats.table import format_info

if TYPE_CHECKING:
    from quark.torch.quantization.config.config import QuantizationSpec

class NonFiniteTensorError(ValueError):
    """A tensor seen during calibration holds NaN or Inf."""


def _split_spec(spec: QuantizationSpec | Sequence[QuantizationSpec]
                ) -> tuple[QuantizationSpec, QuantizationSpec | None]:
    if isinstance(spec, (list, tuple)):
        if len(spec) != 2:
            raise ValueError(f"a multi-stage quantization spec must have exactly 2 stages, got {len(spec)}")
        return spec[0], spec[1]
    return spec, None


def _make_observer(spec: QuantizationSpec) -> nn.Module:
    from quark.torch.quantization.observer.observer import default_observer_for

    cls = spec.observer_cls or default_observer_for(spec.dtype, spec.qscheme)
    return cls(spec)


def _round_method(spec: QuantizationSpec) -> RoundType:
    return spec.round_method or RoundType.half_even


def _qscheme(spec: QuantizationSpec) -> QSchemeType:
    return spec.qscheme or QSchemeType.per_tensor


def compute_qparams(x: torch.Tensor, spec: QuantizationSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that ``spec``'s observer derives from ``x`` alone."""
    observer = _make_observer(spec)
    observer(x)
    return observer.calculate_qparams()


def fake_quantize_with_spec(x: torch.Tensor, spec: QuantizationSpec, scale: torch.Tensor | None = None,
                            zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize ``x`` per ``spec`` (qparams from ``x`` itself unless given). Same dtype as ``x``."""
    kind = spec.kind
    if kind == "cast":
        return x.to(format_info(spec.dtype).torch_dtype).to(x.dtype)
    if kind == "mx":
        return formats.mx_fake_quantize(x, spec.mx_element, axis=_axis(spec), block_size=spec.group_size or 32,
                                        scale_mode=spec.mx_scale_mode)
    if kind == "bfp":
        return formats.bfp_fake_quantize(x, spec.dtype, axis=_axis(spec), block_size=spec.group_size)
    if scale is None:
        scale, zero_point = compute_qparams(x, spec)
    return formats.fake_quantize(x, scale.to(x.device), _zp(zero_point, x.device), spec.dtype,
                                 qscheme=_qscheme(spec), ch_axis=spec.ch_axis,
                                 group_size=spec.group_size, round_method=_round_method(spec))


def _axis(spec: QuantizationSpec) -> int:
    return -1 if spec.ch_axis is None else spec.ch_axis


def _zp(zero_point: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if zero_point is None else zero_point.to(device)


class FakeQuantize(nn.Module):
    """Quantize-dequantize one tensor (an input, output, weight or bias) per a ``QuantizationSpec``.

    ``scale`` and ``zero_point`` are buffers (saved in ``state_dict``) once known. ``name`` is the
    qualified name used in error messages (``model.layers.0.mlp.down_proj.input_quantizer``).
    """

    scale: torch.Tensor | None
    zero_point: torch.Tensor | None

    def __init__(self, spec: QuantizationSpec | Sequence[QuantizationSpec], name: str = "") -> None:
        super().__init__()
        self.spec, second = _split_spec(spec)
        self.name = name
        self.info = format_info(self.spec.dtype)
        self.kind = self.spec.kind
        self.needs_qparams = self.kind in ("int", "float")
        self.is_dynamic = bool(self.spec.is_dynamic)
        self.observer = _make_observer(self.spec) if self.needs_qparams else None
        self._register_qparams()
        self.observing = self.needs_qparams and not self.is_dynamic
        self.fake_quant_enabled = True
        self.qparams_fixed = False
        self.scale_quantizer: FakeQuantize | None = None
        if second is not None:
            self.register_buffer("scale_2", None)
            self.register_buffer("zero_point_2", None)
            self.scale_quantizer = SecondStageQuantize(second, owner=self, name=f"{name}.scale_quantizer")

    def _register_qparams(self) -> None:
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    def store_second_stage_on(self, owner: nn.Module, prefix: str) -> None:
        """Keep the second stage's qparams as buffers ``{prefix}scale_2`` / ``{prefix}zero_point_2`` of ``owner``.

        Current values move with them; nothing happens for a single-stage quantizer.
        """
        if isinstance(self.scale_quantizer, SecondStageQuantize):
            self.scale_quantizer.relocate(owner, prefix)

    # -- state control -------------------------------------------------------------------------
    def enable_observer(self) -> None:
        if self.needs_qparams and not self.is_dynamic and not self.qparams_fixed:
            self.observing = True

    def disable_observer(self) -> None:
        self.observing = False

    def enable_fake_quant(self) -> None:
        self.fake_quant_enabled = True

    def disable_fake_quant(self) -> None:
        self.fake_quant_enabled = False

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        """Fix the quantization parameters (e.g. chosen by GPTQ); the observer is not used again."""
        from quark.torch.quantization.config.type import ZeroPointType

        check_finite_qparams(scale, zero_point, self.name)
        self.scale = scale.detach().clone()
        if zero_point is not None:
            zero_point = zero_point.detach().clone()
            integer_zp = self.kind == "int" and self.spec.zero_point_type != ZeroPointType.float32
            if integer_zp and zero_point.is_floating_point():
                zero_point = torch.round(zero_point).to(torch.int32)
        self.zero_point = zero_point
        self.observing = False
        self.qparams_fixed = True

    @property
    def merge_invariant(self) -> bool:
        """Whether calibrating on batches merged along the batch dimension records and applies what
        the batches one by one would: an observing quantizer asks its observer; a dynamic per-tensor
        activation quantizer would take one range over the merged batch (a weight's is its own)."""
        if self.observing:
            return self.observer is not None and self.observer.merge_invariant
        if self.is_dynamic and self.needs_qparams and _qscheme(self.spec) == QSchemeType.per_tensor:
            return (self.name or "").endswith(("weight_quantizer", "bias_quantizer"))
        return True

    def finalize(self) -> None:
        """End calibration: turn the observer's statistics into fixed ``scale``/``zero_point``."""
        if self.observing:
            if self.observer is None or not self.observer.has_statistics:
                raise RuntimeError(f"{self.name or 'FakeQuantize'}: no calibration data reached this "
                                   "quantizer; check that the calibration dataloader runs through it")
            scale, zero_point = self.observer.calculate_qparams()
            check_finite_qparams(scale, zero_point, self.name)
            self.scale, self.zero_point = scale, zero_point
            self.observing = False
        second = self.scale_quantizer
        if second is not None and second.observing:
            if second.observer is not None and second.observer.has_statistics:
                second.finalize()
            elif self.scale is not None:
                second.calibrate_from(self.scale)

    def calibrate_from(self, x: torch.Tensor) -> None:
        """Observe ``x`` alone (a weight) and fix the qparams it gives (every format refuses NaN/Inf)."""
        check_finite(x, self.name, "tensor")
        if not self.needs_qparams:
            return
        if self.is_dynamic:
            if self.scale_quantizer is not None:
                self.scale_quantizer.calibrate_from(compute_qparams(x, self.spec)[0])
            return
        if self.observer is not None:
            self.observer.reset_state()
            self.observer(x)
        self.observing = True
        self.finalize()
        if self.observer is not None:  # the qparams come from x alone: its statistics are not needed again (a
            self.observer.reset_state()  # per-group weight's minima and maxima are as large as its scales)

    # -- quantization ----------------------------------------------------------------------------
    def qparams_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (possibly second-stage-quantized) scale and zero point applied to ``x``."""
        if self.is_dynamic:
            scale, zero_point = compute_qparams(x, self.spec)
            check_finite_qparams(scale, zero_point, self.name)
        else:
            if self.scale is None:
                raise RuntimeError(f"{self.name or 'FakeQuantize'}: static quantizer has no scale; "
                                   "run calibration (ModelQuantizer.quantize_model) first")
            scale, zero_point = self.scale, self.zero_point
        if self.scale_quantizer is not None:
            scale = self.scale_quantizer(scale)
        return scale.to(x.device), _zp(zero_point, x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            check_finite(x, self.name)
            if self.observer is not None:
                self.observer(x)
            return x
        if not self.fake_quant_enabled:
            return x
        if not self.needs_qparams:
            if self.kind != "cast":  # a NaN/Inf element would turn its whole block into NaN
                check_finite(x, self.name, "tensor")
            return fake_quantize_with_spec(x, self.spec)
        scale, zero_point = self.qparams_for(x)
        return formats.fake_quantize(x, scale, zero_point, self.spec.dtype, qscheme=_qscheme(self.spec),
                                     ch_axis=self.spec.ch_axis, group_size=self.spec.group_size,
                                     round_method=_round_method(self.spec))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Real codes of ``x`` (integers, float8, or fp4/fp6 bit patterns) with the current qparams."""
        scale, zero_point = self.qparams_for(x)
        return formats.quantize(x, scale, zero_point, self.spec.dtype, qscheme=_qscheme(self.spec),
                                ch_axis=self.spec.ch_axis, group_size=self.spec.group_size,
                                round_method=_round_method(self.spec))

    def extra_repr(self) -> str:
        spec = self.spec
        parts = [f"dtype={spec.dtype.name}", f"qscheme={_qscheme(spec).name}"]
        if spec.group_size:
            parts.append(f"group_size={spec.group_size}")
        if spec.mx_element is not None:
            parts.append(f"mx_element={spec.mx_element.name}")
        parts.append("dynamic" if self.is_dynamic else "static")
        return ", ".join(parts)


class SecondStageQuantize(FakeQuantize):
    """The second stage of a two-stage spec: quantizes the first stage's scales.

    Its ``scale`` / ``zero_point`` are views of two buffers of a storage module (the first stage,
    or where :meth:`relocate` put them), so moving, saving or loading that module carries them.
    """

    def __init__(self, spec: QuantizationSpec, owner: nn.Module, name: str = "") -> None:
        # a plain attribute, not a submodule: the storage module is an ancestor of this one
        object.__setattr__(self, "_storage", (owner, ""))
        super().__init__(spec, name=name)
        if self.scale_quantizer is not None:
            raise ValueError(f"{name or 'FakeQuantize'}: a scale quantizer cannot have stages of its own")

    def _register_qparams(self) -> None:
        return None

    def relocate(self, owner: nn.Module, prefix: str) -> None:
        """Move the qparams to buffers ``{prefix}scale_2`` / ``{prefix}zero_point_2`` of ``owner``."""
        old_owner, old_prefix = self._storage
        values = {"scale_2": self.scale, "zero_point_2": self.zero_point}
        for kind in values:
            old_owner._buffers.pop(f"{old_prefix}{kind}", None)
        for kind, value in values.items():
            owner.register_buffer(f"{prefix}{kind}", value)
        object.__setattr__(self, "_storage", (owner, prefix))

    def _get(self, kind: str) -> torch.Tensor | None:
        owner, prefix = self._storage
        return owner._buffers.get(f"{prefix}{kind}")

    def _set(self, kind: str, value: torch.Tensor | None) -> None:
        owner, prefix = self._storage
        setattr(owner, f"{prefix}{kind}", value)

    @property  # type: ignore[override]
    def scale(self) -> torch.Tensor | None:
        return self._get("scale_2")

    @scale.setter
    def scale(self, value: torch.Tensor | None) -> None:
        self._set("scale_2", value)

    @property  # type: ignore[override]
    def zero_point(self) -> torch.Tensor | None:
        return self._get("zero_point_2")

    @zero_point.setter
    def zero_point(self, value: torch.Tensor | None) -> None:
        self._set("zero_point_2", value)


def _all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no NaN/Inf, in one reduction: ``aminmax`` propagates NaN and an infinity is an
    extreme (``isfinite(x).all()`` makes three passes and a boolean copy of ``x``)."""
    if x.numel() == 0:
        return True
    if x.element_size() == 1:  # float8: no aminmax kernel
        return bool(torch.isfinite(x).all())
    low, high = torch.aminmax(x)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(x: torch.Tensor | None, name: str, what: str = "calibration tensor") -> None:
    """Raise :class:`NonFiniteTensorError` naming ``name`` when ``x`` holds NaN or Inf.

    The one rule of every format: a weight, a calibration tensor, a scale or a zero point that is
    not finite is refused here, at the quantizer that would use it, instead of turning into NaN
    codes or NaN outputs.
    """
    if x is None or not x.is_floating_point() or _all_finite(x):
        return
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    hint = ("it was computed from a tensor holding NaN/Inf or a range beyond float32"
            if what in ("scale", "zero point") else "fix the model or the calibration data")
    raise NonFiniteTensorError(
        f"{name or 'tensor'}: {what} of shape {tuple(x.shape)} contains {n_nan} NaN and {n_inf} Inf "
        f"values; {hint}"
    )


def check_finite_qparams(scale: torch.Tensor | None, zero_point: torch.Tensor | None, name: str) -> None:
    """``check_finite`` for a quantizer's scale and zero point, named ``{name}.scale`` / ``.zero_point``."""
    prefix = name or "FakeQuantize"
    check_finite(scale, f"{prefix}.scale", "scale")
    check_finite(zero_point, f"{prefix}.zero_point", "zero point")
