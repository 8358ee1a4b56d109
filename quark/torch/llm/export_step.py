"""Export and reload for the command line, through ``quark.torch.export`` (layer 9).

Each ``--model_export`` format is written by ``ModelExporter``; ``--model_reload`` rebuilds a
quantized model with ``ModelImporter``. Requests are validated before any work is done.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quark.torch.quantization.config.config import Config

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("hf_format", "onnx", "gguf")
CUSTOM_MODES = ("quark", "awq", "fp8", "compressed-tensors")
IMPORT_FORMATS = ("hf_format",)
# the optional packages each format is written with
FORMAT_PACKAGES = {"onnx": "onnx", "gguf": "gguf"}


def check_export_request(formats: list[str], custom_mode: str) -> None:
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"--model_export={fmt!r} is not one of: {', '.join(EXPORT_FORMATS)}")
        package = FORMAT_PACKAGES.get(fmt)
        if package is not None:
            try:
                importlib.import_module(package)
            except ImportError:
                raise ValueError(f"--model_export {fmt} needs the {package!r} package, which is not installed "
                                 f"(pip install {package})") from None
    if custom_mode not in CUSTOM_MODES:
        raise ValueError(f"--custom_mode={custom_mode!r} is not one of: {', '.join(CUSTOM_MODES)}")
    if custom_mode != "quark" and "hf_format" not in formats:
        raise ValueError(f"--custom_mode {custom_mode} applies to --model_export hf_format, which was not asked")


def export_model(model: nn.Module, config: Config, tokenizer: Any, formats: list[str], folder: Path, *,
                 custom_mode: str, model_type: str, model_dir: Path, sample: torch.Tensor,
                 kv_cache_group: list[str] | None, min_kv_scale: float) -> dict[str, str]:
    """Write every format of ``formats`` under ``folder``; return ``{format: path}``.

    hf_format is the folder itself (a Hugging Face model folder); ONNX and GGUF go to the
    ``onnx/`` and ``gguf/`` sub-folders.
    """
    from quark.torch.export.api import ModelExporter
    from quark.torch.export.config.config import ExporterConfig, JsonExporterConfig

    json_config = JsonExporterConfig(kv_cache_group=list(kv_cache_group or []), min_kv_scale=min_kv_scale)
    written: dict[str, str] = {}
    # hf_format first: it creates ``folder`` itself (atomically); the others are sub-folders
    for fmt in sorted(formats, key=lambda f: f != "hf_format"):
        if fmt != "hf_format":
            folder.mkdir(exist_ok=True)
        target = folder if fmt == "hf_format" else folder / fmt
        exporter = ModelExporter(config=ExporterConfig(json_export_config=json_config), export_dir=str(target))
        logger.info("exporting %s to %s", fmt, target)
        if fmt == "hf_format":
            exporter.export_safetensors_model(model, quant_config=config, custom_mode=custom_mode,
                                              tokenizer=tokenizer)
        elif fmt == "onnx":
            exporter.export_onnx_model(model, sample)  # token ids; the exporter adds the attention mask
        else:
            exporter.export_gguf_model(model, str(model_dir), model_type)
        written[fmt] = str(target)
    return written


def import_model(model: nn.Module, import_dir: Path) -> nn.Module:
    """Load the quantized checkpoint of ``import_dir`` into the float ``model`` (hf_format)."""
    from quark.torch.export.api import ModelImporter

    importer = ModelImporter(model_info_dir=str(import_dir), saved_format="safetensors")
    return importer.import_model_info(model)


__all__ = ["CUSTOM_MODES", "EXPORT_FORMATS", "IMPORT_FORMATS", "check_export_request",
           "export_model", "import_model"]
