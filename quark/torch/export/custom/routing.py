"""The routing loop every custom layout shares: Quark-layout tensors, converted per quantized layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from quark.torch.export.config.config import JsonExporterConfig
from quark.torch.export.hf_format.writer import check_exportable, quark_tensors
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear

# (layer name, layer, checkpoint suffix in the Quark layout, tensor) -> the tensors to write instead
Convert = Callable[[str, QuantLinear, str, torch.Tensor], list[tuple[str, torch.Tensor]]]


def convert_per_module(model: nn.Module, json_cfg: JsonExporterConfig, convert: Convert
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """The Quark-layout tensors of ``model``; those of each frozen ``QuantLinear`` go through ``convert``.

    Tensors of other modules (embeddings, norms, excluded layers) are kept as they are. ``convert``
    gets the layer's name, the layer, the Quark checkpoint suffix (``weight``, ``weight_scale``,
    ``input_zero_point`` ...) and the tensor, and returns ``(name, tensor)`` pairs (none drops it).
    Checks run at once; the tensors come lazily, as :func:`quark_tensors` gives them.
    """
    modules = check_exportable(model)
    return _converted(quark_tensors(model, json_cfg), modules, convert)


def _converted(tensors: Iterator[tuple[str, torch.Tensor]], modules: dict[str, QuantLinear], convert: Convert
               ) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in tensors:
        mod_name, _, suffix = name.rpartition(".")
        module = modules.get(mod_name)
        if module is None:
            yield name, tensor
        else:
            yield from convert(mod_name, module, suffix, tensor)


__all__ = ["Convert", "convert_per_module"]
