"""Export and reload for the command line, through ``quark.torch.export`` (layer 9).

Each ``--model_export`` format is written by ``ModelExporter``; ``--model_reload`` rebuilds a
quantized model with ``ModelImporter``. When the installed package lacks one of them, the
functions here raise a ``ValueError`` naming the missing feature, before any work is done.
"""

from __future__ import annotations

import importlib
import importlib.util
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
# feature -> (class, method, module that implements it)
_NEEDS: dict[str, tuple[str, str, str]] = {
    "hf_format": ("ModelExporter", "export_safetensors_model", "quark.torch.export.hf_format.writer"),
    "onnx": ("ModelExporter", "export_onnx_model", "quark.torch.export.onnx.exporter"),
    "gguf": ("ModelExporter", "export_gguf_model", "quark.torch.export.gguf.exporter"),
    "import": ("ModelImporter", "import_model_info", "quark.torch.export.hf_format.reader"),
    "custom_mode fp8": ("ModelExporter", "export_safetensors_model", "quark.torch.export.custom.fp8"),
    "custom_mode awq": ("ModelExporter", "export_safetensors_model", "quark.torch.export.custom.awq"),
    "custom_mode compressed-tensors": ("ModelExporter", "export_safetensors_model",
                                       "quark.torch.export.custom.compressed_tensors"),
}


def _export_api() -> Any | None:
    try:
        return importlib.import_module("quark.torch.export.api")
    except ImportError:
        return None


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def check_available(feature: str) -> None:
    """``ValueError`` unless ``quark.torch.export`` provides what ``feature`` needs."""
    cls_name, method, module = _NEEDS[feature]
    api = _export_api()
    cls = getattr(api, cls_name, None) if api is not None else None
    what = {"import": "model import (--model_reload)"}.get(feature, f"--{feature}" if feature.startswith("custom")
                                                           else f"--model_export {feature}")
    if cls is None or not hasattr(cls, method):
        raise ValueError(f"{what} is not available in this installation: quark.torch.export.api."
                         f"{cls_name}.{method} is missing")
    if not _module_exists(module):
        raise ValueError(f"{what} is not available in this installation: module {module} is missing")


def check_export_request(formats: list[str], custom_mode: str) -> None:
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"--model_export={fmt!r} is not one of: {', '.join(EXPORT_FORMATS)}")
        check_available(fmt)
    if custom_mode not in CUSTOM_MODES:
        raise ValueError(f"--custom_mode={custom_mode!r} is not one of: {', '.join(CUSTOM_MODES)}")
    if custom_mode != "quark":
        if "hf_format" not in formats:
            raise ValueError(f"--custom_mode {custom_mode} applies to --model_export hf_format, which was not asked")
        check_available(f"custom_mode {custom_mode}")


def export_model(model: nn.Module, config: Config, tokenizer: Any, formats: list[str], folder: Path, *,
                 custom_mode: str, model_type: str, model_dir: Path, sample: torch.Tensor,
                 kv_cache_group: list[str] | None, min_kv_scale: float) -> dict[str, str]:
    """Write every format of ``formats`` under ``folder``; return ``{format: path}``.

    hf_format is the folder itself (a Hugging Face model folder); ONNX and GGUF go to the
    ``onnx/`` and ``gguf/`` sub-folders.
    """
    api = _export_api()
    from quark.torch.export.config.config import ExporterConfig, JsonExporterConfig

    json_config = JsonExporterConfig(kv_cache_group=list(kv_cache_group or []), min_kv_scale=min_kv_scale)
    written: dict[str, str] = {}
    # hf_format first: it creates ``folder`` itself (atomically); the others are sub-folders
    for fmt in sorted(formats, key=lambda f: f != "hf_format"):
        if fmt != "hf_format":
            folder.mkdir(exist_ok=True)
        target = folder if fmt == "hf_format" else folder / fmt
        exporter = api.ModelExporter(config=ExporterConfig(json_export_config=json_config),  # type: ignore[union-attr]
                                     export_dir=str(target))
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
    api = _export_api()
    importer = api.ModelImporter(model_info_dir=str(import_dir), saved_format="safetensors")  # type: ignore[union-attr]
    return importer.import_model_info(model)


__all__ = ["CUSTOM_MODES", "EXPORT_FORMATS", "IMPORT_FORMATS", "check_available", "check_export_request",
           "export_model", "import_model"]
