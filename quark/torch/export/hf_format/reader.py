"""Reader of the Quark hf_format: validate ``config.json``, build skeletons, assign tensors.

Every error names the file and the tensor; nothing is unpickled (safetensors only).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from packaging import version
from torch import nn

import quark
from quark.torch.export.hf_format.skeleton import build_skeletons
from quark.torch.export.hf_format.writer import owner_of, quant_modules, spec_of
from quark.torch.export.keys import checkpoint_suffix, from_checkpoint_tensor, module_suffix, split_role
from quark.torch.export.safetensors_io import (
    INDEX_NAME,
    SAFE_NAME,
    CheckpointError,
    check_finite,
    file_inside,
    iter_checkpoint,
    shown,
)
from quark.torch.quantization.calibration.layerwise import find_decoder_layers
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
# What malformed values inside a well-formed JSON object raise in constructors and skeleton building
# (a string where a dict belongs, 400-digit integers, group_size = 2**62 overflowing a numel ...):
# turned into a CheckpointError naming the file at the loader boundary.
MALFORMED_VALUE_ERRORS = (TypeError, AttributeError, KeyError, IndexError, OverflowError, RecursionError,
                          RuntimeError)
_MAX_MESSAGE_CHARS = 400


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; any unreadable, invalid or non-object content is a CheckpointError."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__})") from None
    except json.JSONDecodeError as e:  # its message gives a position, never the file's content
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at byte {e.pos})") from None
    except (ValueError, RecursionError) as e:  # bad UTF-8, integers too long, nesting too deep
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_config_json(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: not a Hugging Face model folder")
    return read_json_object(file_inside(folder, "config.json", str(folder)))


def parse_config(path: Path, qc: dict[str, Any]) -> Config:
    """``Config.from_dict`` of a checkpoint's ``quantization_config``; every failure names ``path``."""
    try:
        return Config.from_dict(qc)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: quantization_config: {str(e)[:_MAX_MESSAGE_CHARS]}") from e
    except MALFORMED_VALUE_ERRORS as e:
        raise CheckpointError(f"{path}: quantization_config is malformed ({type(e).__name__}: "
                              f"{str(e)[:_MAX_MESSAGE_CHARS]})") from e


def online_rotation_config(config: Config) -> Any:
    """The QuaRot config with online Hadamards (``had=True``) of ``config``, or ``None``."""
    algorithms = [*(config.pre_quant_opt_config or []), *(config.algo_config or [])]
    quarot = [c for c in algorithms if getattr(c, "name", None) == "quarot" and getattr(c, "had", False)]
    return quarot[0] if quarot else None


def read_quantization_config(folder: str | Path) -> dict[str, Any]:
    """The checkpoint's ``quantization_config``, validated (method and version)."""
    path = Path(folder) / "config.json"
    qc = read_config_json(folder).get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path} has no 'quantization_config' object: the folder holds no quantized "
                              "model (export one with ModelExporter.export_safetensors_model)")
    method = qc.get("quant_method")
    if not isinstance(method, str) or method not in CUSTOM_METHODS:
        raise CheckpointError(f"{path}: quantization_config.quant_method={shown(method)} is not one of: "
                              f"{', '.join(CUSTOM_METHODS)}")
    if method == "quark":
        check_version(path, qc.get("version"))
    return qc


def check_version(path: Path, value: object) -> None:
    """Accept Quark format versions up to ours (same major); refuse unknown or newer ones."""
    ours = version.parse(quark.__version__)
    theirs = None
    text = str(value) if type(value) in (str, int, float) else ""
    if text and len(text) <= 64:
        try:
            theirs = version.parse(text.split("+")[0])
        except version.InvalidVersion:
            theirs = None
    if theirs is None or value is None:
        raise CheckpointError(f"{path}: quantization_config.version={shown(value)} is not a Quark version; "
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


def _converted(tensor: torch.Tensor, converted: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """``converted`` (``tensor`` cast to the model's dtype) after checking the cast lost nothing that
    matters: a float that overflows the model's dtype or an integer that wraps around is refused."""
    if converted.is_floating_point() and tensor.dtype != converted.dtype:
        if converted.dtype.itemsize >= 2 or converted.dtype == getattr(torch, "float8_e8m0fnu", None):
            try:
                check_finite(converted, name, path)
            except CheckpointError:
                raise CheckpointError(f"{path}: tensor {shown(name)} ({tensor.dtype}) overflows the model's "
                                      f"{converted.dtype} (values become Inf/NaN)") from None
    elif not converted.is_floating_point() and converted.dtype != torch.bool and tensor.dtype != converted.dtype \
            and not torch.equal(converted.to(tensor.dtype), tensor):
        raise CheckpointError(f"{path}: tensor {shown(name)} holds values that {converted.dtype} cannot represent "
                              f"(stored as {tensor.dtype}; out of range or not integers)")
    return converted


def _check_scale(tensor: torch.Tensor, name: str, path: Path | str) -> None:
    """A quantization scale must be finite and positive (a zero scale divides by zero)."""
    if not tensor.is_floating_point() or tensor.device.type == "meta":
        return
    check_finite(tensor, name, path)
    values = tensor if tensor.dtype.itemsize >= 2 else tensor.float()
    bad = int((values <= 0).sum())
    if bad:
        raise CheckpointError(f"{path}: tensor {shown(name)} has {bad} scale(s) <= 0; scales must be positive")


def _check_rotation(tensor: torch.Tensor, name: str, path: Path | str, size: int | None = None) -> None:
    """An online rotation is a square ±1 (int8) Hadamard matrix; anything else (uninitialised memory
    of a buffer the checkpoint did not fill, a corrupted tensor) is refused."""
    if tensor.device.type == "meta":
        return
    square = tensor.dim() == 2 and tensor.shape[0] == tensor.shape[1] and (size is None or tensor.shape[0] == size)
    if not square:
        expected = f"[{size}, {size}]" if size is not None else "a square matrix"
        raise CheckpointError(f"{path}: tensor {shown(name)} has shape {list(tensor.shape)}; an online rotation "
                              f"must be {expected}")
    if tensor.is_floating_point():
        check_finite(tensor, name, path)
    if bool(((tensor != 1) & (tensor != -1)).any()):
        raise CheckpointError(f"{path}: tensor {shown(name)} is not a ±1 Hadamard matrix: the checkpoint does not "
                              "hold this online rotation (missing or corrupted)")


def declare_online_rotations(model: nn.Module, quant_config: Config) -> None:
    """Give QuaRot's online-R4 linears an ``input_rotation`` buffer for the checkpoint to fill.

    transformers keeps only checkpoint keys the model declares; without this the Hadamard of each
    MLP writer's input would be dropped and the model would silently compute something else. The
    placeholder is all zeros (or ``meta``): a rotation the checkpoint does not fill is refused by
    :func:`load_tensors` / :func:`check_quantized_state`, never used.
    """
    quarot = online_rotation_config(quant_config)
    if quarot is None:
        return
    mlp_name = getattr(quarot, "mlp", "mlp") or "mlp"
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    owners: dict[str, list[tuple[str, QuantLinear]]] = {}
    for name, module in model.named_modules():
        parent, _, _ = name.rpartition(".")
        if isinstance(module, QuantLinear) and parent.split(".")[-1] == mlp_name and module.out_features == hidden:
            owners.setdefault(parent, []).append((name, module))
    if not owners:
        # no `mlp` module (OPT's fc1/fc2 sit in the decoder layer): the MLP writer is the linear of a
        # decoder layer that maps a wider input back to the hidden size outside attention
        _, layers = find_decoder_layers(model, getattr(quarot, "model_decoder_layers", None) or None)
        for i, layer in enumerate(layers):
            for name, module in layer.named_modules():
                if isinstance(module, QuantLinear) and module.out_features == hidden and \
                        module.in_features > module.out_features and "attn" not in name and "attention" not in name:
                    owners.setdefault(str(i), []).append((name, module))
    if not owners:
        raise CheckpointError(f"the checkpoint was rotated by QuaRot with online Hadamards (had=True), but no "
                              f"quantized MLP linear writes the hidden size {hidden}; cannot place its input_rotation "
                              "buffers")
    for parent, found in owners.items():
        if len(found) != 1:
            raise CheckpointError(f"QuaRot online rotation: {parent} has {len(found)} linears writing the hidden "
                                  f"size ({[n for n, _ in found]}); expected one")
        _, module = found[0]
        if module.input_rotation is None:
            n = module.in_features
            module.input_rotation = torch.zeros(n, n, dtype=torch.int8, device=module.weight.device)


def load_tensors(model: nn.Module, folder: str | Path, tensors_iter: Any = None) -> None:
    """Assign every checkpoint tensor of ``folder`` to ``model`` (skeletons already in place)."""
    targets = model.state_dict(keep_vars=True)
    modules = quant_modules(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for name, tensor, path in tensors_iter if tensors_iter is not None else iter_checkpoint(folder):
        if tensor.is_complex():
            raise CheckpointError(f"{path}: tensor {shown(name)} is complex ({tensor.dtype}); model tensors are real")
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
            if key.rpartition(".")[2] in ("input_rotation", QK_ROTATION):
                in_features = getattr(model.get_submodule(key.rpartition(".")[0]), "in_features", None) \
                    if key.endswith("input_rotation") else None
                _check_rotation(tensor, name, path, in_features)
            _assign(model, key, tensor)
            loaded.add(key)
            continue
        if target is None:
            unexpected.append(f"{shown(name)} ({path.name})")
            continue
        if kind_info is not None:
            module, role, kind = kind_info
            tensor = _converted(tensor, from_checkpoint_tensor(kind, tensor, spec_of(module, role, kind), target),
                                name, path)
            if kind.startswith("scale"):
                _check_scale(tensor, name, path)
        elif tensor.dtype != target.dtype:
            if not (tensor.is_floating_point() and target.is_floating_point()
                    and tensor.element_size() > 1 and target.element_size() > 1):
                raise CheckpointError(f"{path}: tensor {shown(name)} has dtype {tensor.dtype}, the model expects "
                                      f"{target.dtype} (was the checkpoint written with another config?)")
            tensor = _converted(tensor, tensor.to(target.dtype), name, path)
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{path}: tensor {shown(name)} has shape {list(tensor.shape)}, the model expects "
                                  f"{list(target.shape)} for {key}")
        _assign(model, key, tensor)
        loaded.add(key)
    if unexpected:
        raise CheckpointError(f"{folder}: {len(unexpected)} checkpoint tensor(s) match nothing in "
                              f"{type(model).__name__}: {unexpected[:8]}")
    rotations = [k for k in targets if k not in loaded and k.endswith("input_rotation")]
    if rotations:
        raise CheckpointError(f"{folder}: quantization_config claims QuaRot with online rotations (had=True), but the "
                              f"checkpoint holds no {rotations[:8]}; without them the model would compute something "
                              "else")
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


def file_of_tensor(folder: str | Path, name: str) -> str:
    """The checkpoint file of ``folder`` that holds tensor ``name`` per its index (for error messages);
    the folder itself when that cannot be told."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    try:
        if index.is_file():
            shard = read_json_object(index).get("weight_map", {}).get(name)
            return str(folder / shard) if isinstance(shard, str) else str(folder)
        if (folder / SAFE_NAME).is_file():
            return str(folder / SAFE_NAME)
    except (CheckpointError, AttributeError, OSError):
        pass
    return str(folder)


def _check_loaded_tensor(module: QuantLinear | None, suffix: str, tensor: torch.Tensor, name: str,
                         where: str) -> None:
    if module is not None and suffix == "input_rotation":
        _check_rotation(tensor, name, where, module.in_features)
    elif module is not None and (suffix.endswith("_quantizer.scale") or suffix.endswith("scale_2")):
        _check_scale(tensor, name, where)
    else:
        check_finite(tensor, name, where)


def _loaded_tensors(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor, QuantLinear | None]]:
    """(checkpoint name, module-state suffix, tensor, owning QuantLinear or None) of every tensor a
    checkpoint fills: all state of the quantized layers and the parameters of the other modules."""
    modules = quant_modules(model)
    for mod_name, module in modules.items():
        for suffix, tensor in module.state_dict(keep_vars=True).items():
            if tensor is not None:
                ckpt = f"{mod_name}.{checkpoint_suffix(suffix) or suffix}" if mod_name else suffix
                yield ckpt, suffix, tensor, module
    for name, param in model.named_parameters():
        if owner_of(name, modules) is None:
            yield name, name, param, None


def check_quantized_state(model: nn.Module, folder: str | Path | None) -> None:
    """Refuse a loaded model holding NaN/Inf weights or qparams, non-positive scales or an online
    rotation that is not a ±1 Hadamard matrix; errors give the checkpoint name of the tensor and,
    when known, its file. Tensors still on ``meta`` (offloaded) are skipped."""
    for ckpt, suffix, tensor, module in _loaded_tensors(model):
        if tensor.device.type == "meta":
            continue
        try:
            _check_loaded_tensor(module, suffix, tensor, ckpt, str(folder) if folder else type(model).__name__)
        except CheckpointError:
            if folder is None:
                raise
            # the index is read only now, on the error path, to name the file holding the tensor
            _check_loaded_tensor(module, suffix, tensor, ckpt, file_of_tensor(folder, ckpt))
            raise


def load_quark_folder(model: nn.Module, folder: str | Path, qc: dict[str, Any]) -> nn.Module:
    """Rebuild the quantized model of an hf_format folder in ``model`` (float or meta weights)."""
    path = Path(folder) / "config.json"
    config = parse_config(path, qc)
    export = qc.get("export") or {}
    if not isinstance(export, dict):
        raise CheckpointError(f"{path}: quantization_config.export must be an object, got {type(export).__name__}")
    weight_format = export.get("weight_format", "real_quantized")
    if weight_format != "real_quantized":
        raise CheckpointError(f"{path}: export.weight_format={shown(weight_format)}; "
                              "only 'real_quantized' checkpoints can be imported")
    pack_method = export.get("pack_method", "reorder")
    if pack_method not in ("reorder", "order"):
        raise CheckpointError(f"{path}: export.pack_method={shown(pack_method)} is not one of: reorder, order")
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        try:
            build_skeletons(model, config, pack_method=pack_method)
            attach_attention_quantizers(model, config)  # post-RoPE K/V and softmax quantizers, when configured
            declare_online_rotations(model, config)
        except CheckpointError:
            raise
        except ValueError as e:
            raise CheckpointError(f"{path}: quantization_config does not fit {type(model).__name__}: "
                                  f"{str(e)[:_MAX_MESSAGE_CHARS]}") from e
        except MALFORMED_VALUE_ERRORS as e:
            raise CheckpointError(f"{path}: quantization_config cannot be applied to {type(model).__name__} "
                                  f"({type(e).__name__}: {str(e)[:_MAX_MESSAGE_CHARS]})") from e
    load_tensors(model, folder)
    for name, module in model.named_modules():  # attention quantizers: fix the loaded qparams
        for attr in ATTENTION_QUANTIZERS:
            quantizer = getattr(module, attr, None)
            if isinstance(quantizer, FakeQuantize) and quantizer.observing:
                if quantizer.scale is None:
                    raise CheckpointError(f"{folder}: the checkpoint has no scale for {name}.{attr}")
                _check_scale(quantizer.scale, f"{name}.{attr}.scale", folder)
                quantizer.set_qparams(quantizer.scale, quantizer.zero_point)
    check_quantized_state(model, folder)
    model.quant_config = config  # type: ignore[assignment]
    return model


__all__ = [
    "CUSTOM_METHODS",
    "MALFORMED_VALUE_ERRORS",
    "check_quantized_state",
    "check_version",
    "declare_online_rotations",
    "file_of_tensor",
    "load_quark_folder",
    "load_tensors",
    "online_rotation_config",
    "parse_config",
    "read_config_json",
    "read_json_object",
    "read_quantization_config",
]
