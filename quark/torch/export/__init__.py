"""Export and import of quantized models: hf_format safetensors, ONNX, GGUF."""

from quark.torch.export.api import ModelExporter, ModelImporter
from quark.torch.export.config.config import ExporterConfig, JsonExporterConfig, OnnxExporterConfig

__all__ = ["ExporterConfig", "JsonExporterConfig", "ModelExporter", "ModelImporter", "OnnxExporterConfig"]
