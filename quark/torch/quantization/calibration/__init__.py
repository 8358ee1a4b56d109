"""Calibration drivers: the layer-by-layer runner shared by all algorithms."""

from quark.torch.quantization.calibration.layerwise import (
    CapturedInputs,
    LayerStep,
    ModelBackup,
    capture_decoder_inputs,
    find_decoder_layers,
    run_layerwise,
)

__all__ = [
    "CapturedInputs",
    "LayerStep",
    "ModelBackup",
    "capture_decoder_inputs",
    "find_decoder_layers",
    "run_layerwise",
]
