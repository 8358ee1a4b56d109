"""Writer of the Quark hf_format: ``config.json`` with ``quantization_config`` + safetensors.

Module state is mapped to checkpoint names through :mod:`quark.torch.export.keys`; nothing here
knows a model family. Tensors are references into the model until a shard is serialised.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import quark
from quark.torch.export.config.config import JsonExporterConfig
from quark.torch.export.hf_format.merge import merge_members, merged_weight_state
from quark.torch.export.keys import TENSOR_ROLES, checkpoint_suffix, split_role, to_checkpoint_tensor
from quark.torch.quantization.calibration.layerwise import find_decoder_layers
from quark.torch.quantization.calibration.placement import placement_units, unit_read
from quark.torch.quantization.calibration.weight_source import disk_weights
from quark.torch.quantization.config.config import Config, QuantizationSpec
from quark.torch.quantization.config.resolve import matches_any
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear

logger = logging.getLogger(__name__)

# What the Hugging Face hub accepts as a repository id: ``name`` or ``owner/name`` (letters, digits,
# ``-``, ``_``, ``.``; no leading or trailing ``-``/``.``, no ``--`` or ``..``; at most 96 per part).
_HUB_PART = r"(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")
# ``quantization_config.version``: the format level as amd-quark writes its release ("0.13", not "0.13.0").
FORMAT_VERSION = ".".join(quark.__version__.split(".")[:2])
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def quant_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def check_exportable(model: nn.Module) -> dict[str, QuantLinear]:
    """The frozen QuantLinear modules of ``model``; raise naming the fix when there are none or some are not frozen."""
    modules = quant_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no quantized layer: quantize it with "
                         "ModelQuantizer(config).quantize_model(model, dataloader) and call "
                         "ModelQuantizer.freeze(model) before exporting")
    unfrozen = [n for n, m in modules.items() if not m.frozen]
    if unfrozen:
        raise ValueError(f"{len(unfrozen)} quantized layer(s) are not frozen (e.g. {unfrozen[:3]}); call "
                         "ModelQuantizer.freeze(model) before exporting")
    return modules


def owner_of(key: str, modules: dict[str, Any]) -> tuple[str, str] | None:
    """(module name, suffix) when ``key`` belongs to one of ``modules`` (longest match), else None."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in modules:
            return prefix, ".".join(parts[i:])
    if "" in modules:
        return "", key
    return None


def spec_of(module: QuantLinear, role: str, kind: str) -> QuantizationSpec | None:
    quantizer = getattr(module, f"{role}_quantizer", None)
    if quantizer is None:
        return None
    if kind.endswith("_2"):
        return quantizer.scale_quantizer.spec if quantizer.scale_quantizer is not None else None
    return quantizer.spec


def quantizer_state(suffix: str) -> tuple[str, str] | None:
    """(role, kind) of a QuantLinear state suffix holding qparams, else ``None``.

    ``input_quantizer.zero_point`` -> (input, zero_point); ``weight_scale_2`` -> (weight, scale_2).
    """
    if "_quantizer." in suffix:
        return split_role(suffix)
    role, _, kind = suffix.partition("_")
    if role in TENSOR_ROLES and kind in ("scale_2", "zero_point_2"):
        return role, kind
    return None


def quark_tensors(model: nn.Module, json_config: JsonExporterConfig,
                  transform: Callable[[str, QuantLinear, str, torch.Tensor], torch.Tensor | None] | None = None,
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, tensor)`` of the whole model in the Quark layout, in ``state_dict`` order.

    Checks run at once; the tensors come lazily: references into the model (no data copied) or, for
    a model on disk, each placement unit read when its first tensor is asked for and dropped after
    its last (:func:`model_state`), so a writer consuming them holds one shard and one unit.
    """
    modules = check_exportable(model)
    members = merge_members(modules, json_config.weight_merge_groups) if json_config.weight_merge_groups else []
    return _quark_tensors(model, modules, members, json_config, transform)


def _quark_tensors(model: nn.Module, modules: dict[str, QuantLinear], members: list[list[str]],
                   json_config: JsonExporterConfig,
                   transform: Callable[[str, QuantLinear, str, torch.Tensor], torch.Tensor | None] | None,
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    kv_group = json_config.kv_cache_group
    merged: dict[str, dict[str, torch.Tensor]] = {}
    pending = {n for names in members for n in names}
    previous = ""
    for key, tensor in model_state(model):
        owner = owner_of(key, modules)
        name = key
        if owner is not None:
            mod_name, suffix = owner
            module = modules[mod_name]
            if mod_name in pending:  # its merge group's weights are loaded now (one decoder layer)
                group = [names for names in members if mod_name in names]
                merged.update(merged_weight_state(modules, [], members=group))
                pending.difference_update(*group)
            tensor = merged.get(mod_name, {}).get(suffix, tensor)
            ckpt = checkpoint_suffix(suffix)
            if ckpt is None:
                raise ValueError(f"{key}: state {suffix!r} of a QuantLinear has no checkpoint name; known: "
                                 "weight, bias, <role>_quantizer.scale/zero_point, <role>_scale_2, "
                                 "weight_micro_exponent, input_rotation")
            name = f"{mod_name}.{ckpt}"
            state = quantizer_state(suffix)
            if state is not None:
                role, kind = state
                converted = to_checkpoint_tensor(kind, tensor, spec_of(module, role, kind))
                if converted is None:
                    continue
                tensor = converted
                if role == "output" and kind == "scale" and kv_group and matches_any(mod_name, kv_group):
                    tensor = tensor.clamp(min=json_config.min_kv_scale)
            if transform is not None:
                transformed = transform(mod_name, module, ckpt, tensor)
                if transformed is None:
                    continue
                tensor = transformed
        if owner is not None and owner[0] != previous:
            merged.pop(previous, None)  # a module's state is consecutive: the previous one is written
            previous = owner[0]
        yield name, tensor


def model_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict()`` items, a tensor sharing its data with one already given (tied weights)
    left out; for a model on disk read one placement unit at a time (in CPU memory)."""
    source = disk_weights(model)
    if source is None:
        seen: dict[tuple[int, tuple[int, ...], torch.dtype], str] = {}
        for key, tensor in model.state_dict().items():
            if tensor.device.type == "meta":
                raise ValueError(f"{key} is on the meta device (never loaded); cannot export it")
            if tensor.numel() > 0 and tensor.device.type == "cpu":
                ident = (tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(),
                         tuple(tensor.shape), tensor.dtype)
                if ident in seen:
                    logger.info("%s shares its data with %s (tied weights): written once", key, seen[ident])
                    continue
                seen[ident] = key
            yield key, tensor
        return
    try:
        decoder: tuple[str, nn.ModuleList] | None = find_decoder_layers(model)
    except ValueError:
        decoder = None
    units = {name: (module, whole) for name, module, whole in placement_units(model, decoder)}
    first: dict[int, str] = {}
    groups: list[tuple[str, list[str]]] = []
    for key, value in model.state_dict(keep_vars=True).items():
        if first.setdefault(id(value), key) != key:
            logger.info("%s shares its data with %s (tied weights): written once", key, first[id(value)])
            continue
        unit = _unit_of(key, units)
        if groups and groups[-1][0] == unit:
            groups[-1][1].append(key)
        else:
            groups.append((unit, [key]))
    for unit, keys in groups:
        if unit not in units:  # buffers of modules without parameters: in memory
            state = model.state_dict()
            for key in keys:
                yield key, state[key]
            continue
        module, whole = units[unit]
        with unit_read(module, "cpu", whole):
            state = module.state_dict(prefix=f"{unit}.")
            for key in keys:
                yield key, state[key]
            del state


def _unit_of(key: str, units: dict[str, Any]) -> str:
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in units:
            return prefix
    return ""


def quark_quantization_config(config: Config, json_config: JsonExporterConfig) -> dict[str, Any]:
    """``config.json["quantization_config"]`` of the Quark layout."""
    body = config.to_dict()
    body.pop("min_kv_scale", None)  # recorded in the export block, as Quark does
    return {"quant_method": "quark", "version": FORMAT_VERSION, **body, "export": json_config.to_dict()}


def public_model_id(name_or_path: object) -> str | None:
    """The hub id a model was loaded from, or ``None`` when ``name_or_path`` names a local path.

    ``from_pretrained("org/model")`` records the hub id; ``from_pretrained("/home/me/model")`` records
    the folder, which an export must not carry (it shows user names and directory layout). A string
    that could be either (``models/llama``) is taken as a path when that path exists here.
    """
    text = str(name_or_path or "")
    if not _HUB_ID.fullmatch(text) or Path(text).exists():
        return None
    return text


def public_config_dict(model_config: Any) -> dict[str, Any]:
    """``model_config.to_dict()`` without local paths: ``_name_or_path`` only when it is a hub id."""
    data = model_config.to_dict()
    hub_id = public_model_id(data.pop("_name_or_path", None))
    if hub_id is not None:
        data["_name_or_path"] = hub_id
    return data


def effective_json_config(config: Config, json_config: JsonExporterConfig) -> JsonExporterConfig:
    """``json_config`` with the KV-cache group and minimum scale filled from ``config`` when unset."""
    kv_group = list(json_config.kv_cache_group) or list(config.kv_cache_quant_config or {})
    min_kv = json_config.min_kv_scale or config.min_kv_scale
    return JsonExporterConfig(weight_merge_groups=json_config.weight_merge_groups, kv_cache_group=kv_group,
                              min_kv_scale=min_kv, pack_method=json_config.pack_method,
                              weight_format=json_config.weight_format)


def write_model_files(model: nn.Module, folder: Path, quantization_config: dict[str, Any],
                      tokenizer: Any = None) -> None:
    """config.json (with ``quantization_config``), generation config and tokenizer files."""
    model_config = getattr(model, "config", None)
    if model_config is None or not hasattr(model_config, "to_dict"):
        raise ValueError(f"{type(model).__name__} has no Hugging Face `config`; hf_format export needs a "
                         "transformers PreTrainedModel")
    data = public_config_dict(model_config)
    data["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
        return
    source = Path(str(getattr(model_config, "_name_or_path", "") or ""))
    if source.is_dir():
        for fname in TOKENIZER_FILES:
            if (source / fname).is_file() and not (folder / fname).exists():
                shutil.copy2(source / fname, folder / fname)


__all__ = [
    "FORMAT_VERSION",
    "check_exportable",
    "effective_json_config",
    "model_state",
    "owner_of",
    "public_config_dict",
    "public_model_id",
    "quant_modules",
    "quantizer_state",
    "quark_quantization_config",
    "quark_tensors",
    "write_model_files",
]
