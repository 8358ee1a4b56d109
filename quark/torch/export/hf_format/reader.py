"""Reader of the Quark hf_format: validate ``config.json``, build skeletons, assign tensors.

Every error names the file and the tensor; nothing is unpickled (safetensors only).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from packaging import version
from torch import nn

import quark
from quark.torch.export.hf_format.skeleton import build_skeletons
from quark.torch.export.hf_format.writer import owner_of, quant_modules, spec_of
from quark.torch.export.keys import from_checkpoint_tensor, module_suffix, split_role
from quark.torch.export.safetensors_io import CheckpointError, iter_checkpoint
from quark.torch.quantization.config.config import Config
from quark.torch.quantization.nn.modules.quantize_attention import (
    ATTENTION_QUANTIZERS,
    QK_ROTATION,
    attach_attention_quantizers,
)
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
from quark.torch.quantization.tensor_quantize import FakeQuantize

logger = logging.getLogger(__name__)

CUSTOM_METHODS = ("quark", "fp8", "awq")


def read_config_json(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: not a Hugging Face model folder")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_quantization_config(folder: str | Path) -> dict[str, Any]:
    """The checkpoint's ``quantization_config``, validated (method and version)."""
    path = Path(folder) / "config.json"
    qc = read_config_json(folder).get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path} has no 'quantization_config' object: the folder holds no quantized "
                              "model (export one with ModelExporter.export_safetensors_model)")
    method = qc.get("quant_method")
    if method not in CUSTOM_METHODS:
        raise CheckpointError(f"{path}: quantization_config.quant_method={method!r} is not one of: "
                              f"{', '.join(CUSTOM_METHODS)}")
    if method == "quark":
        check_version(path, qc.get("version"))
    return qc


def check_version(path: Path, value: object) -> None:
    """Accept Quark format versions up to ours (same major); refuse unknown or newer ones."""
    ours = version.parse(quark.__version__)
    try:
        theirs = version.parse(str(value).split("+")[0])
    except version.InvalidVersion:
        theirs = None
    if theirs is None or value is None:
        raise CheckpointError(f"{path}: quantization_config.version={value!r} is not a Quark version; "
                              f"supported: 0.x up to {ours.major}.{ours.minor}")
    if theirs.major != ours.major or (theirs.major, theirs.minor) > (ours.major, ours.minor):
        raise CheckpointError(f"{path}: quantization_config.version={value!r} is unknown to this quark "
                              f"({quark.__version__}); supported: {ours.major}.x up to {ours.major}.{ours.minor}")


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = key.rpartition(".")
    module = model.get_submodule(mod_name) if mod_name else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=bool(old is not None and old.requires_grad
                                                                           and tensor.is_floating_point()))
    else:
        module._buffers[attr] = tensor


def _declared_buffer(model: nn.Module, key: str) -> bool:
    """A buffer the model declares but holds no tensor for yet (QuantLinear ``input_rotation``,
    attention quantizers' qparams), or QuaRot's ``qk_rotation``, which rotation adds to attention."""
    mod_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return False
    return (attr in module._buffers and module._buffers[attr] is None) or attr == QK_ROTATION


def load_tensors(model: nn.Module, folder: str | Path, tensors_iter: Any = None) -> None:
    """Assign every checkpoint tensor of ``folder`` to ``model`` (skeletons already in place)."""
    targets = model.state_dict(keep_vars=True)
    modules = quant_modules(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor, path in tensors_iter if tensors_iter is not None else iter_checkpoint(folder):
        key = name
        owner = owner_of(name, modules)
        kind_info = None
        if owner is not None:
            mod_name, suffix = owner
            msuffix = module_suffix(suffix)
            if msuffix is not None:
                key = f"{mod_name}.{msuffix}"
                if "_quantizer." in msuffix:
                    role, kind = split_role(msuffix)
                    kind_info = (modules[mod_name], role, kind)
        target = targets.get(key)
        if target is None and _declared_buffer(model, key):
            _assign(model, key, tensor)
            loaded.add(key)
            continue
        if target is None:
            unexpected.append(f"{name} ({path.name})")
            continue
        if kind_info is not None:
            module, role, kind = kind_info
            tensor = from_checkpoint_tensor(kind, tensor, spec_of(module, role, kind), target)
        elif tensor.dtype != target.dtype:
            if not (tensor.is_floating_point() and target.is_floating_point()
                    and tensor.element_size() > 1 and target.element_size() > 1):
                raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, the model expects "
                                      f"{target.dtype} (was the checkpoint written with another config?)")
            tensor = tensor.to(target.dtype)
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(tensor.shape)}, the model expects "
                                  f"{list(target.shape)} for {key}")
        _assign(model, key, tensor)
        loaded.add(key)
    if unexpected:
        raise CheckpointError(f"{folder}: {len(unexpected)} checkpoint tensor(s) match nothing in "
                              f"{type(model).__name__}: {unexpected[:8]}")
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    still_meta = [k for k, v in model.state_dict(keep_vars=True).items() if v.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{folder}: {len(still_meta)} model tensor(s) are missing from the checkpoint: "
                              f"{still_meta[:8]}")
    missing = [k for k in targets if k not in loaded]
    if missing:
        logger.warning("%d model tensor(s) were not in the checkpoint and keep their current values: %s",
                       len(missing), missing[:8])


def load_quark_folder(model: nn.Module, folder: str | Path, qc: dict[str, Any]) -> nn.Module:
    """Rebuild the quantized model of an hf_format folder in ``model`` (float or meta weights)."""
    config = Config.from_dict(qc)
    export = qc.get("export") or {}
    weight_format = export.get("weight_format", "real_quantized")
    if weight_format != "real_quantized":
        raise CheckpointError(f"{Path(folder) / 'config.json'}: export.weight_format={weight_format!r}; "
                              "only 'real_quantized' checkpoints can be imported")
    pack_method = export.get("pack_method", "reorder")
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        build_skeletons(model, config, pack_method=pack_method)
        attach_attention_quantizers(model, config)  # post-RoPE K/V and softmax quantizers, when configured
    load_tensors(model, folder)
    for name, module in model.named_modules():  # attention quantizers: fix the loaded qparams
        for attr in ATTENTION_QUANTIZERS:
            quantizer = getattr(module, attr, None)
            if isinstance(quantizer, FakeQuantize) and quantizer.observing:
                if quantizer.scale is None:
                    raise CheckpointError(f"{folder}: the checkpoint has no scale for {name}.{attr}")
                quantizer.set_qparams(quantizer.scale, quantizer.zero_point)
    model.quant_config = config  # type: ignore[assignment]
    return model


__all__ = ["CUSTOM_METHODS", "check_version", "load_quark_folder", "load_tensors", "read_config_json",
           "read_quantization_config"]
