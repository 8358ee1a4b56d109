"""Export and reload for the command line, through ``quark.torch.export`` (layer 9).

Each ``--model_export`` format is written by ``ModelExporter``; ``--model_reload`` rebuilds a
quantized model with ``ModelImporter``. Requests are validated before any work is done: the flags
and packages first (:func:`check_export_request`), then the family (:func:`check_export_model`),
then every layer's resolved config against every asked format (:func:`check_export_layers`), so a
format that cannot hold the scheme fails before calibration, not after the first export.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quark.torch.quantization.config.config import Config, QuantizationConfig
from quark.torch.quantization.config.resolve import is_quantizable, name_matches, resolve

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("hf_format", "onnx", "gguf")
CUSTOM_MODES = ("quark", "awq", "fp8", "compressed-tensors")
IMPORT_FORMATS = ("hf_format",)
FP8_SCALE_NAMES = ("vllm", "transformers")
# the Python packages each output needs (module name, pip name)
_PACKAGES: dict[str, list[tuple[str, str]]] = {
    "onnx": [("onnx", "onnx")],
    "gguf": [("gguf", "gguf"), ("sentencepiece", "sentencepiece")],
    "compressed-tensors": [("compressed_tensors", "compressed-tensors")],
}


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _check_packages(output: str, flag: str) -> None:
    missing = [pip for module, pip in _PACKAGES.get(output, []) if not _installed(module)]
    if missing:
        raise ValueError(f"{flag} {output} needs the Python package(s) {', '.join(missing)}, which are not "
                         f"installed: pip install {' '.join(missing)}")


def check_export_request(formats: list[str], custom_mode: str, fp8_scale_names: str = "vllm") -> None:
    """Flags and installed packages of an export request (needs neither the model nor the config)."""
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"--model_export={fmt!r} is not one of: {', '.join(EXPORT_FORMATS)}")
    if custom_mode not in CUSTOM_MODES:
        raise ValueError(f"--custom_mode={custom_mode!r} is not one of: {', '.join(CUSTOM_MODES)}")
    if custom_mode != "quark" and "hf_format" not in formats:
        raise ValueError(f"--custom_mode {custom_mode} applies to --model_export hf_format, which was not asked")
    if fp8_scale_names not in FP8_SCALE_NAMES:
        raise ValueError(f"--fp8_scale_names={fp8_scale_names!r} is not one of: {', '.join(FP8_SCALE_NAMES)}")
    if fp8_scale_names != "vllm" and custom_mode != "fp8":
        raise ValueError(f"--fp8_scale_names {fp8_scale_names} applies to --custom_mode fp8 only")
    for fmt in formats:
        _check_packages(fmt, "--model_export")
    if "hf_format" in formats:
        _check_packages(custom_mode, "--custom_mode")


def check_export_model(formats: list[str], model_type: str, model_dir: Path) -> None:
    """What an export needs of the model family and folder (before the model is loaded)."""
    if "gguf" in formats:
        from quark.torch.export.gguf.exporter import LLAMA_TYPES

        if model_type not in LLAMA_TYPES:
            raise ValueError(f"--model_export gguf supports model_type {', '.join(LLAMA_TYPES)}; this model is "
                             f"{model_type!r}")
        if not (model_dir / "tokenizer.model").is_file():
            raise ValueError(f"--model_export gguf needs a SentencePiece tokenizer.model in {model_dir}; none there")


def _layer_configs(model: nn.Module, config: Config) -> dict[str, QuantizationConfig]:
    """The effective config of every quantizable layer that will be quantized."""
    out: dict[str, QuantizationConfig] = {}
    for name, module in model.named_modules():
        if is_quantizable(module):
            qconfig = resolve(name, module, config).config
            if qconfig is not None:
                out[name] = qconfig
    return out


def _first(spec: Any) -> Any:
    return spec[0] if isinstance(spec, (list, tuple)) else spec


def _gguf_problems(layers: dict[str, QuantizationConfig], unfit_layers: str) -> list[str]:
    from quark.torch.export.gguf.exporter import SUPPORTED, spec_block_type

    bad = [name for name, cfg in layers.items() if name != "lm_head" and spec_block_type(cfg.weight) is None]
    if not bad:
        return []
    hint = (" (--unfit_layers keep leaves layers that do not fit in float, which GGUF writes as F16)"
            if unfit_layers == "fallback" else "")
    return [f"--model_export gguf: {len(bad)} layer(s) have weights with no GGML block type (e.g. {bad[0]}: "
            f"{_describe(layers[bad[0]].weight)}){hint}; GGUF export supports {SUPPORTED}"]


def _onnx_problems(layers: dict[str, QuantizationConfig]) -> list[str]:
    from quark.torch.export.onnx.exporter import SUPPORTED, spec_problem

    for name, cfg in layers.items():
        for field in ("weight", "input_tensors", "output_tensors"):
            spec = getattr(cfg, field)
            problem = spec_problem(spec) if spec is not None else None
            if problem:
                return [f"--model_export onnx cannot represent {name} {field}: {problem}. Supported: {SUPPORTED}"]
    return []


def _custom_problems(custom_mode: str, config: Config, layers: dict[str, QuantizationConfig]) -> list[str]:
    owner = f"--custom_mode {custom_mode}"
    from quark.torch.quantization.config.config import QuaRotConfig

    if custom_mode != "quark" and any(isinstance(a, QuaRotConfig) for a in config.algo_config or []):
        return [f"{owner} cannot hold QuaRot's online rotations; use --custom_mode quark"]
    try:
        if custom_mode == "fp8":
            from quark.torch.export.custom.fp8 import fp8_quantization_config, is_fp8_per_tensor

            fp8_quantization_config(config)
            kv = list(config.kv_cache_quant_config)
            for name, cfg in layers.items():
                is_kv = any(name_matches(name, p) for p in kv)
                if not is_fp8_per_tensor(cfg.weight) or (cfg.input_tensors is not None
                                                         and not is_fp8_per_tensor(cfg.input_tensors)) \
                        or (cfg.output_tensors is not None and not (is_kv and is_fp8_per_tensor(cfg.output_tensors))):
                    return [f"{owner} cannot hold layer {name} ({_describe(cfg.weight)} weights): the fp8 layout "
                            "is fp8_e4m3 per-tensor weights/activations and fp8 KV-cache scales"]
        elif custom_mode == "awq":
            from quark.torch.export.custom.awq import awq_quantization_config

            group = awq_quantization_config(config)["group_size"]
            for name, cfg in layers.items():
                weight = _first(cfg.weight)
                if weight is None or weight.group_size != group or cfg.input_tensors is not None \
                        or cfg.output_tensors is not None:
                    return [f"{owner} cannot hold layer {name} ({_describe(cfg.weight)}): the AutoAWQ layout has "
                            f"one group size ({group}) for the whole model and no activation quantization"]
        elif custom_mode == "compressed-tensors":
            from quark.torch.export.custom.compressed_tensors import check_config_group

            configs = list(layers.values())
            for name, cfg in layers.items():
                if cfg != configs[0]:
                    return [f"{owner} writes one config group: layer {name} is quantized differently from "
                            "the others"]
            if configs:
                check_config_group(configs[0])
    except ValueError as exc:
        return [f"{owner}: {exc}"]
    return []


def _describe(spec: Any) -> str:
    from quark.torch.quantization.config.resolve import describe_spec

    return describe_spec(spec)


def check_export_layers(model: nn.Module, config: Config, formats: list[str], custom_mode: str) -> None:
    """Every asked format against every layer's effective config; ``ValueError`` naming each problem."""
    if not formats:
        return
    layers = _layer_configs(model, config)
    problems: list[str] = []
    if "gguf" in formats:
        problems += _gguf_problems(layers, config.unfit_layers)
    if "onnx" in formats:
        problems += _onnx_problems(layers)
    if "hf_format" in formats:
        problems += _custom_problems(custom_mode, config, layers)
    if problems:
        raise ValueError("the requested export cannot hold this quantization (checked before any work; nothing "
                         "was written): " + " | ".join(problems))


def fp8_consumer_note(custom_mode: str, fp8_scale_names: str) -> str | None:
    """For ``--custom_mode fp8``: which program reads the scale names written, and how to switch."""
    if custom_mode != "fp8":
        return None
    if fp8_scale_names == "vllm":
        return ("custom_mode fp8 writes vLLM's scale names (weight_scale / input_scale / k_scale / v_scale): "
                "load it with vLLM; transformers ignores these names and would run unscaled fp8 weights. "
                "For transformers pass --fp8_scale_names transformers")
    return ("custom_mode fp8 writes transformers' FineGrainedFP8 names (weight_scale_inv / activation_scale): "
            "load it with transformers; vLLM reads other names, and no KV-cache scales are written")


def export_model(model: nn.Module, config: Config, tokenizer: Any, formats: list[str], folder: Path, *,
                 custom_mode: str, model_type: str, model_dir: Path, sample: torch.Tensor,
                 kv_cache_group: list[str] | None, min_kv_scale: float, fp8_scale_names: str = "vllm",
                 ) -> dict[str, str]:
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
                                              tokenizer=tokenizer, fp8_scale_names=fp8_scale_names)
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


__all__ = ["CUSTOM_MODES", "EXPORT_FORMATS", "FP8_SCALE_NAMES", "IMPORT_FORMATS", "check_export_layers",
           "check_export_model", "check_export_request", "export_model", "fp8_consumer_note", "import_model"]
