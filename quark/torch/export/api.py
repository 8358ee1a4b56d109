"""Quark export and import API: ``ModelExporter``, ``ModelImporter`` and ``_map_to_quark``.

``_map_to_quark`` is called by transformers' quark integration (``QuarkHfQuantizer``) before it
loads a Quark checkpoint, so its name and signature are public.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quark.torch.export.config.config import ExporterConfig, JsonExporterConfig
from quark.torch.export.hf_format.reader import (
    MALFORMED_VALUE_ERRORS,
    check_quantized_state,
    declare_online_rotations,
    load_quark_folder,
    read_config_json,
    read_quantization_config,
)
from quark.torch.export.hf_format.skeleton import build_skeletons
from quark.torch.export.hf_format.writer import (
    check_exportable,
    effective_json_config,
    quark_quantization_config,
    quark_tensors,
    write_model_files,
)
from quark.torch.export.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    AtomicFolder,
    CheckpointError,
    shown,
    write_sharded,
)
from quark.torch.quantization.calibration import distributed
from quark.torch.quantization.config.config import Config
from quark.torch.quantization.moe_experts import UnfusedExperts

logger = logging.getLogger(__name__)

CUSTOM_MODES = ("quark", "fp8", "awq", "compressed-tensors")


def _model_config(model: nn.Module, quant_config: Config | None) -> Config:
    config = quant_config if quant_config is not None else getattr(model, "quant_config", None)
    if not isinstance(config, Config):
        raise ValueError("export needs the quark Config the model was quantized with: pass "
                         f"quant_config=... (got {type(config).__name__})")
    return config


class ModelExporter:
    """Write a quantized (frozen) model as hf_format safetensors, ONNX or GGUF under ``export_dir``.

    :param ExporterConfig config: export settings (``json_export_config`` for hf_format).
    :param export_dir: destination folder; written into a temporary folder beside it, then swapped in,
        so it always holds a complete output (:class:`~quark.torch.export.output_folder.AtomicFolder`).
        A non-empty ``export_dir`` is replaced only with ``overwrite=True`` and only when it holds a
        previous export: ``config.json`` with a ``quantization_config``, ``quark_model.onnx`` or a
        ``*.gguf`` file. It must not be or contain the current directory or a filesystem root.

    Under a ``torch.distributed`` process group of several ranks (data-parallel calibration), every
    rank may call the export: rank 0 writes, the other ranks return the same path at once without
    touching the disk (the folder is complete when rank 0's call returns).
    """

    def __init__(self, config: ExporterConfig | None = None, export_dir: str | Path | None = None) -> None:
        self.config = config if config is not None else ExporterConfig()
        if not isinstance(self.config, ExporterConfig):
            raise ValueError(f"ModelExporter(config=...) must be an ExporterConfig, got {type(config).__name__}")
        self.export_dir = Path(export_dir) if export_dir is not None else Path(tempfile.gettempdir()) / "quark_export"

    def export_safetensors_model(self, model: nn.Module, quant_config: Config | None = None,
                                 custom_mode: str = "quark", tokenizer: Any = None, *,
                                 overwrite: bool = False, max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
                                 fp8_scale_names: str = "vllm") -> Path:
        """Export ``model`` (quantized and frozen) in the Hugging Face safetensors layout.

        :param custom_mode: ``"quark"`` (Quark's hf_format, read by vLLM and transformers' quark
            integration), ``"fp8"`` (native fp8: ``quant_method: "fp8"``), ``"awq"`` (AutoAWQ GEMM) or
            ``"compressed-tensors"`` (vLLM's llm-compressor layout).
        :param tokenizer: saved beside the model; when ``None`` tokenizer files are copied from the
            model's source folder if it is local.
        :param overwrite: replace a non-empty ``export_dir`` that holds a previous export (refused otherwise).
        :param max_shard_size: shard limit (bytes or ``"5GB"``); over it, shards + index are written.
        :param fp8_scale_names: ``custom_mode="fp8"`` only: ``"vllm"`` writes ``weight_scale`` /
            ``input_scale`` / ``k_scale`` / ``v_scale`` (vLLM's per-tensor fp8 names);
            ``"transformers"`` writes ``weight_scale_inv`` / ``activation_scale`` (transformers'
            ``FineGrainedFP8`` names). No single naming is read by both programs.
        :return: the export folder.
        """
        if custom_mode not in CUSTOM_MODES:
            raise ValueError(f"export_safetensors_model(custom_mode={custom_mode!r}) is not one of: "
                             f"{', '.join(CUSTOM_MODES)}")
        if _other_rank("export_safetensors_model"):
            return self.export_dir
        config = _model_config(model, quant_config)
        json_cfg = effective_json_config(config, self.config.json_export_config)
        if json_cfg.weight_format != "real_quantized":
            raise ValueError(f"JsonExporterConfig.weight_format={json_cfg.weight_format!r} is not supported "
                             "by this exporter; supported: real_quantized")
        modules = check_exportable(model)
        wrong_pack = sorted({m.pack_method for m in modules.values()} - {json_cfg.pack_method})
        if wrong_pack:
            raise ValueError(f"the model was frozen with pack_method={wrong_pack}, but "
                             f"JsonExporterConfig.pack_method={json_cfg.pack_method!r}; freeze with the same one")
        if custom_mode != "quark" and any(isinstance(m, UnfusedExperts) for m in model.modules()):
            logger.warning("custom_mode=%r with per-expert MoE Linears: transformers 5 merges these into its fused "
                           "experts without their quantization (its output would be wrong); load this folder with "
                           "a per-expert consumer, or export custom_mode='quark', which transformers and "
                           "ModelImporter reload exactly", custom_mode)
        if custom_mode == "quark":
            tensors = quark_tensors(model, json_cfg)
            qc = quark_quantization_config(config, json_cfg)
        elif custom_mode == "fp8":
            from quark.torch.export.custom.fp8 import fp8_checkpoint

            tensors, qc = fp8_checkpoint(model, config, json_cfg, scale_names=fp8_scale_names)
        elif custom_mode == "awq":
            from quark.torch.export.custom.awq import awq_checkpoint

            tensors, qc = awq_checkpoint(model, config, json_cfg)
        else:
            from quark.torch.export.custom.compressed_tensors import compressed_tensors_checkpoint

            tensors, qc = compressed_tensors_checkpoint(model, config, json_cfg)
        with AtomicFolder(self.export_dir, overwrite=overwrite) as folder:
            files = write_sharded(folder.path, tensors, max_shard_size=max_shard_size)
            write_model_files(model, folder.path, qc, tokenizer)
        logger.info("exported %s (%s layout, %d file(s)) to %s", type(model).__name__, custom_mode,
                    len(files), self.export_dir)
        return self.export_dir

    def export_quark_model(self, model: nn.Module, quant_config: Config | None = None,
                           custom_mode: str = "quark", **kwargs: Any) -> Path:
        """Same as :meth:`export_safetensors_model` (the older name of the hf_format export)."""
        return self.export_safetensors_model(model, quant_config, custom_mode=custom_mode, **kwargs)

    def export_onnx_model(self, model: nn.Module, input_args: Any, input_names: list[str] | None = None,
                          output_names: list[str] | None = None, verbose: bool = False,
                          opset_version: int | None = None, do_constant_folding: bool = True,
                          uint4_int4_flag: bool = False, *, overwrite: bool = False) -> Path:
        """Export ``model`` (quantized; frozen or not) as ONNX with QuantizeLinear/DequantizeLinear.

        Writes ``quark_model.onnx`` in ``export_dir``; see :mod:`quark.torch.export.onnx.exporter`.
        """
        from quark.torch.export.onnx.exporter import export_onnx

        del uint4_int4_flag  # int4/uint4 are native Q/DQ types at the opset used; kept for API compatibility
        if _other_rank("export_onnx_model"):
            return self.export_dir / "quark_model.onnx"
        onnx_cfg = self.config.onnx_export_config
        with AtomicFolder(self.export_dir, overwrite=overwrite) as folder:
            export_onnx(model, input_args, folder.path / "quark_model.onnx",
                        opset_version=opset_version or onnx_cfg.opset_version,
                        input_names=input_names, output_names=output_names, verbose=verbose,
                        do_constant_folding=do_constant_folding)
        return self.export_dir / "quark_model.onnx"

    def export_gguf_model(self, model: nn.Module, tokenizer_path: str | Path, model_type: str, *,
                          gguf_type: str | None = None, overwrite: bool = False) -> Path:
        """Export a Llama-family ``model`` as ``{model_type}.gguf`` in ``export_dir``.

        :param gguf_type: ``"Q4_0"``, ``"Q4_1"``, ``"Q8_0"``, ``"F16"``, ``"BF16"``, ``"F32"`` or ``None``
            (chosen from the quantization: uint4 asym g32 -> Q4_1, int4 sym g32 -> Q4_0, int8 sym
            per-group 32 -> Q8_0, unquantized -> F16).
        """
        from quark.torch.export.gguf.exporter import export_gguf

        if _other_rank("export_gguf_model"):
            return self.export_dir / f"{model_type}.gguf"
        with AtomicFolder(self.export_dir, overwrite=overwrite) as folder:
            export_gguf(model, Path(tokenizer_path), model_type, folder.path / f"{model_type}.gguf",
                        gguf_type=gguf_type)
        return self.export_dir / f"{model_type}.gguf"


def _other_rank(what: str) -> bool:
    """True on a data-parallel rank other than 0, which leaves writing to rank 0."""
    if distributed.rank() == 0:
        return False
    logger.info("%s: rank %d of a data-parallel run leaves the export to rank 0", what, distributed.rank())
    return True


class ModelImporter:
    """Rebuild a quantized model from an exported hf_format folder.

    :param model_info_dir: the folder ``export_safetensors_model`` wrote.
    :param saved_format: ``"safetensors"`` (also accepted: ``"hf_format"``); nothing else is read.
    """

    def __init__(self, model_info_dir: str | Path, saved_format: str = "safetensors",
                 multi_device: bool = False) -> None:
        if saved_format not in ("safetensors", "hf_format"):
            raise ValueError(f"ModelImporter(saved_format={saved_format!r}) is not one of: safetensors, "
                             "hf_format (checkpoints are never unpickled)")
        self.model_info_dir = Path(model_info_dir)
        self.multi_device = multi_device

    def import_model_info(self, model: nn.Module) -> nn.Module:
        """Load the exported quantized weights into ``model`` (the float model, or one on ``meta``)."""
        qc = read_quantization_config(self.model_info_dir)
        method = qc["quant_method"]
        if method != "quark":
            raise ValueError(f"{self.model_info_dir / 'config.json'}: quant_method={method!r}; ModelImporter "
                             "reads the 'quark' layout (load fp8/awq/compressed-tensors folders with "
                             "transformers)")
        model = load_quark_folder(model, self.model_info_dir, qc)
        model.eval()
        return model

    def load_model(self, dtype: torch.dtype | None = None) -> nn.Module:
        """Build the model from ``config.json`` alone (no float weights needed) and import it."""
        import transformers
        from accelerate import init_empty_weights

        read_quantization_config(self.model_info_dir)
        data = read_config_json(self.model_info_dir)
        data.pop("quantization_config", None)
        path = self.model_info_dir / "config.json"
        model_type = data.pop("model_type", None)
        if not isinstance(model_type, str):
            raise CheckpointError(f"{path}: field 'model_type' must be a string, got {shown(model_type)}")
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, **data)
            with init_empty_weights(include_buffers=False):
                model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype or torch.float32,
                                                                      trust_remote_code=False)
        except Exception as e:  # transformers and huggingface_hub validate with their own error types
            raise CheckpointError(f"{path}: cannot build the model it describes ({type(e).__name__}: "
                                  f"{str(e)[:400]})") from e
        return self.import_model_info(model)


def _map_to_quark(model: nn.Module, quant_config: Config, pack_method: str = "reorder",
                  custom_mode: str = "quark") -> None:
    """Replace ``model``'s quantized ``nn.Linear`` layers by frozen ``QuantLinear`` skeletons.

    Called by transformers' ``QuarkHfQuantizer`` before it loads a checkpoint, whose keys it renames
    (``weight_scale`` -> ``weight_quantizer.scale`` ...) onto these modules.
    """
    if custom_mode not in ("quark", "fp8", "awq"):
        raise ValueError(f"_map_to_quark(custom_mode={custom_mode!r}) is not one of: quark, fp8, awq")
    if custom_mode == "awq":
        raise ValueError("_map_to_quark(custom_mode='awq'): AutoAWQ checkpoints (qweight/qzeros/scales) load "
                         "through transformers' own awq integration, not through quark")
    if not isinstance(quant_config, Config):
        raise ValueError(f"_map_to_quark(quant_config=...) must be a quark Config, got "
                         f"{type(quant_config).__name__}")
    JsonExporterConfig(pack_method=pack_method)  # validates pack_method
    try:
        build_skeletons(model, quant_config, pack_method=pack_method)
    except MALFORMED_VALUE_ERRORS as e:  # e.g. a group size whose tensors overflow
        raise ValueError(f"quantization_config cannot be applied to {type(model).__name__} "
                         f"({type(e).__name__}: {str(e)[:400]})") from e
    declare_online_rotations(model, quant_config)
    _check_state_before_first_forward(model)


def _local_folder(model: nn.Module) -> Path | None:
    """The local folder transformers is loading ``model`` from, when it is one (for error messages)."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if isinstance(name, str) and name and Path(name).is_dir():
        return Path(name)
    return None


class _FirstForwardCheck:
    """Forward pre-hook validating a transformers-loaded model once, before its first forward.

    transformers loads the tensors after ``_map_to_quark`` and calls nothing of quark afterwards; the
    check refuses NaN/Inf weights or qparams, non-positive scales and online rotations the checkpoint
    did not fill (uninitialised memory) before they can produce an output. The hook removes itself
    once the state passed (from the module it runs on, so deep copies behave the same); a failing
    state keeps refusing. A plain object rather than a closure, so the model stays picklable.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.hook_id: int | None = None

    def __call__(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return  # data-dependent checks cannot be traced; the next eager forward runs them
        check_quantized_state(module, self.folder)
        module._forward_pre_hooks.pop(self.hook_id, None)


def _check_state_before_first_forward(model: nn.Module) -> None:
    hook = _FirstForwardCheck(_local_folder(model))
    hook.hook_id = model.register_forward_pre_hook(hook).id


__all__ = ["CUSTOM_MODES", "ModelExporter", "ModelImporter", "_map_to_quark"]
