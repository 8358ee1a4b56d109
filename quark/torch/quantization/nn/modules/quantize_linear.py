"""``QuantLinear`` (layer 5): an ``nn.Linear`` whose input, weight, bias and output are quantized."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from quark.torch.quantization.nn.modules.weight_layout import StoredWeight, pack_weight, unpack_weight
from quark.torch.quantization.tensor_quantize import FakeQuantize

if TYPE_CHECKING:
    from quark.torch.quantization.config.config import QuantizationConfig


class QuantLinear(nn.Linear):
    """Drop-in replacement of ``nn.Linear`` carrying one ``FakeQuantize`` per quantized tensor.

    Built with :meth:`from_float`, it shares the original ``weight``/``bias`` Parameters (no copy).
    :meth:`freeze` replaces the float weight by its real low-bit storage (see ``weight_layout``)
    and dequantizes it on the fly, giving the same outputs as the fake-quantized module.
    ``input_rotation`` (optional ±1 Hadamard, int8 [n, n]) is applied as ``x @ H / sqrt(n)``
    before the input quantizer (QuaRot's online rotation).
    """

    input_rotation: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 quant_config: QuantizationConfig | None = None, name: str = "",
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.name = name
        self.quant_config = quant_config
        self.input_quantizer = self._make(quant_config, "input_tensors", "input_quantizer")
        self.weight_quantizer = self._make(quant_config, "weight", "weight_quantizer")
        self.bias_quantizer = self._make(quant_config, "bias", "bias_quantizer") if bias else None
        self.output_quantizer = self._make(quant_config, "output_tensors", "output_quantizer")
        self.register_buffer("input_rotation", None)
        self.frozen = False
        self.pack_method = "reorder"
        self.float_dtype = dtype or torch.float32

    def _make(self, config: QuantizationConfig | None, field: str, attr: str) -> FakeQuantize | None:
        spec = getattr(config, field, None) if config is not None else None
        if spec is None:
            return None
        quantizer = FakeQuantize(spec, name=f"{self.name}.{attr}")
        if attr != "bias_quantizer":  # (the bias quantizer is folded away by freeze, its second stage with it)
            # two-stage specs: the second scale is this module's `weight_scale_2` (its checkpoint name)
            quantizer.store_second_stage_on(self, attr.removesuffix("quantizer"))
        return quantizer

    @classmethod
    def from_float(cls, linear: nn.Linear, quant_config: QuantizationConfig, name: str = "",
                   calibrate_weight: bool = True) -> QuantLinear:
        """Wrap ``linear`` (sharing its Parameters) and calibrate the weight quantizer from its weight (unless
        ``calibrate_weight`` is False: the caller calibrates it later, see :meth:`weight_qparams_missing`)."""
        with torch.device("meta"):
            module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         quant_config=quant_config, name=name)
        module.weight = linear.weight
        module.bias = linear.bias
        module.float_dtype = linear.weight.dtype
        for quantizer in module.quantizers():
            quantizer.to(linear.weight.device)
        rotation = getattr(linear, "input_rotation", None)
        if isinstance(rotation, torch.Tensor):
            module.input_rotation = rotation
        if calibrate_weight:
            module.recalibrate_weight()
        return module

    def weight_qparams_missing(self) -> bool:
        """Whether a weight (or bias) quantizer that takes its parameters from the tensor has none yet."""
        for quantizer, tensor in ((self.weight_quantizer, self.weight), (self.bias_quantizer, self.bias)):
            if quantizer is None or tensor is None or not quantizer.needs_qparams:
                continue
            if quantizer.is_dynamic:  # only a second stage keeps a static scale (of the scales)
                if quantizer.scale_quantizer is not None and quantizer.scale_quantizer.scale is None:
                    return True
            elif quantizer.scale is None:
                return True
        return False

    def recalibrate_weight(self) -> None:
        """Recompute weight (and bias) qparams from the current weight, unless an algorithm fixed them."""
        if self.frozen:
            return
        if self.weight_quantizer is not None and not self.weight_quantizer.qparams_fixed:
            self.weight_quantizer.calibrate_from(self.weight.detach())
        if self.bias_quantizer is not None and self.bias is not None and not self.bias_quantizer.qparams_fixed:
            self.bias_quantizer.calibrate_from(self.bias.detach())

    def quantizers(self) -> list[FakeQuantize]:
        return [q for q in (self.input_quantizer, self.weight_quantizer, self.bias_quantizer,
                            self.output_quantizer) if q is not None]

    # -- forward ---------------------------------------------------------------------------------
    def quantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as the forward uses it (fake-quantized, or dequantized from storage)."""
        dtype = dtype or self.float_dtype
        wq = self.weight_quantizer
        if wq is None:
            return self.weight.to(dtype)
        if self.frozen:
            stored = StoredWeight(self.weight, wq.scale, wq.zero_point,
                                  scale_2=None if wq.scale_quantizer is None else wq.scale_quantizer.scale,
                                  extra=self._extra_storage())
            return unpack_weight(stored, wq, (self.out_features, self.in_features), self.pack_method,
                                 out_dtype=torch.float32).to(dtype)
        return wq(self.weight).to(dtype)

    def _extra_storage(self) -> dict[str, torch.Tensor]:
        return {name[len("weight_"):]: buf for name, buf in self.named_buffers(recurse=False)
                if name.startswith("weight_") and buf is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            n = self.input_rotation.shape[0]
            x = (x @ self.input_rotation.to(x.dtype)) / math.sqrt(n)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.quantized_weight(x.dtype)
        bias = self.bias
        if bias is not None:
            bias = bias.to(x.dtype)
            if self.bias_quantizer is not None:
                bias = self.bias_quantizer(bias)
        out = F.linear(x, weight, bias)
        if self.output_quantizer is not None:
            out = self.output_quantizer(out)
        return out

    # -- freezing --------------------------------------------------------------------------------
    def freeze(self, pack_method: str = "reorder") -> None:
        """Store the weight in its real low-bit form; safe to call twice."""
        if self.frozen:
            return
        for quantizer in self.quantizers():
            quantizer.finalize()
        wq = self.weight_quantizer
        if wq is not None:
            stored = pack_weight(self.weight.detach(), wq, pack_method)
            self.weight = nn.Parameter(stored.weight, requires_grad=False)
            wq.scale = stored.scale
            wq.zero_point = stored.zero_point
            if stored.scale_2 is not None and wq.scale_quantizer is not None:
                wq.scale_quantizer.scale = stored.scale_2
            for key, tensor in (stored.extra or {}).items():
                self.register_buffer(f"weight_{key}", tensor)
        if self.bias is not None and self.bias_quantizer is not None:
            self.bias = nn.Parameter(self.bias_quantizer(self.bias.detach()), requires_grad=False)
            self.bias_quantizer = None
        self.pack_method = pack_method
        self.frozen = True

    def extra_repr(self) -> str:
        state = "frozen" if self.frozen else "fake-quant"
        return f"{super().extra_repr()}, {state}"
