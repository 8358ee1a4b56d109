"""Loading causal language models and their tokenizers for the LLM tools (layer 10).

* :func:`check_model_dir` rejects folders that are not Hugging Face model folders before any
  weight is read, and folders whose weights are not safetensors (pickles are never loaded) or whose
  safetensors files are truncated;
* :func:`load_tokenizer` applies the conventions every family of the seeds needs: a missing pad
  token is set to the eos token, padding is on the left, and whether a BOS token starts each
  sequence is decided once (:class:`TokenizerInfo`) and applied explicitly by :func:`encode`;
* :func:`load_model` loads with ``AutoModelForCausalLM`` (``dtype="auto"`` by default) onto one
  device, or across the visible GPUs with an accelerate ``device_map`` (``multi_gpu``);
* :func:`load_model_on_disk` builds the model on the meta device and attaches its checkpoint's
  shards as the weight source (the disk placement: each unit is read when a stage needs it).

``EMBEDDED_MODEL_DIR`` is the stories260K Llama shipped inside the package (the default model).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from quark.torch.export.safetensors_io import CheckpointError, check_checkpoint
from quark.torch.quantization.calibration.safetensors_header import TORCH_DTYPES, check_header
from quark.torch.quantization.calibration.weight_source import DiskWeights
from quark.torch.quantization.moe_experts import unfuse_experts

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "stories260K"
EMBEDDED_CALIBRATION_TEXT = EMBEDDED_MODEL_DIR / "calibration.txt"
DTYPES: dict[str, Any] = {
    "auto": "auto",
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
BOS_MODES = ("auto", "yes", "no")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class TokenizerInfo:
    """A tokenizer and the BOS decision taken for it (applied by :func:`encode`)."""

    tokenizer: Any
    add_bos: bool

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id if self.add_bos else None


def check_model_dir(path: str | Path, owner: str = "--model_dir") -> Path:
    """``path`` as a ``Path`` if it is a model folder (a ``config.json`` naming a ``model_type``
    or architecture, and complete safetensors weights), else ``ValueError``."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{owner}={str(path)!r} is not a directory")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{owner}={str(path)!r} is not a Hugging Face model folder: it has no config.json")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{owner}={str(path)!r}: config.json is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not (data.get("model_type") or data.get("architectures")):
        raise ValueError(f"{owner}={str(path)!r}: config.json names neither a model_type nor architectures")
    _check_weights(folder, owner)
    return folder


def _check_weights(folder: Path, owner: str) -> None:
    """``ValueError`` unless ``folder`` holds safetensors weights whose headers are intact."""
    try:
        check_checkpoint(folder)
    except CheckpointError as exc:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles and not any(folder.glob("*.safetensors")):
            raise ValueError(f"{owner}={str(folder)!r} holds only pickle checkpoints ({', '.join(pickles)}); "
                             "only safetensors weights are read (pickles can run code): convert them, e.g. "
                             "load once with transformers and save_pretrained (safetensors by default)") from None
        raise ValueError(f"{owner}={str(folder)!r}: {exc}") from None


def load_config(model_dir: str | Path, trust_remote_code: bool = False) -> Any:
    """The ``transformers`` config of ``model_dir`` (``ValueError`` when it cannot be read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        hint = "" if trust_remote_code else " (if the model needs its own code, add --trust_remote_code)"
        raise ValueError(f"--model_dir={str(model_dir)!r}: transformers cannot read its config: "
                         f"{str(exc).splitlines()[0]}{hint}") from None


def context_length(config: Any) -> int | None:
    """The longest sequence the model was built for (``max_position_embeddings`` or its aliases)."""
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    text_config = getattr(config, "text_config", None)
    return context_length(text_config) if text_config is not None else None


def _sentencepiece_only(folder: Path) -> bool:
    """A llama2.c-style folder: a sentencepiece ``tokenizer.model`` and no HF tokenizer files."""
    return (folder / "tokenizer.model").is_file() and not any((folder / f).is_file() for f in _TOKENIZER_FILES)


def load_tokenizer(model_dir: str | Path, *, max_seq_len: int | None = None, trust_remote_code: bool = False,
                   add_bos: str = "auto") -> TokenizerInfo:
    """Load the tokenizer of ``model_dir`` with pad = eos when missing and left padding.

    ``add_bos``: ``"yes"``/``"no"`` force the BOS decision; ``"auto"`` adds BOS when the tokenizer
    itself puts one in front of a text, or when the folder holds only a sentencepiece model
    (llama2.c convention; ``transformers`` 5 does not add BOS for such folders by itself).
    """
    if add_bos not in BOS_MODES:
        raise ValueError(f"--add_bos={add_bos!r} is not one of: {', '.join(BOS_MODES)}")
    folder = Path(model_dir)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "padding_side": "left"}
    if max_seq_len:
        kwargs["model_max_length"] = max_seq_len
    try:
        if _sentencepiece_only(folder):
            # AutoTokenizer would build a generic backend without sentencepiece's dummy prefix
            # ("Once" -> "O", "n", "ce" instead of "▁Once"); LlamaTokenizer reads the model as is.
            from transformers import LlamaTokenizer

            tokenizer = LlamaTokenizer.from_pretrained(str(folder), **kwargs)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {str(folder)!r}: {str(exc).splitlines()[0]}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {str(folder)!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if add_bos == "auto":
        use_bos = _tokenizer_adds_bos(tokenizer) or (
            _sentencepiece_only(folder) and tokenizer.bos_token_id is not None)
    else:
        use_bos = add_bos == "yes"
        if use_bos and tokenizer.bos_token_id is None:
            raise ValueError(f"--add_bos=yes but the tokenizer of {str(folder)!r} has no bos token")
    return TokenizerInfo(tokenizer, use_bos)


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode(info: TokenizerInfo, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, with BOS in front when ``info.add_bos``."""
    ids = list(info.tokenizer(text, add_special_tokens=False)["input_ids"])
    return [info.tokenizer.bos_token_id, *ids] if info.add_bos else ids


def resolve_device(device: str) -> torch.device:
    """``cpu`` or ``cuda``/``cuda:N``; ``ValueError`` when CUDA is asked for and absent."""
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device={device!r}: no CUDA device is available here; use --device cpu")
        return torch.device(device)
    raise ValueError(f"--device={device!r} is not one of: cpu, cuda, cuda:N")


# Families whose template describes a model class other than AutoModelForCausalLM's: Llama-3.2-Vision
# checkpoints are quantized (language part only) in their full image-text-to-text layout.
_AUTO_CLASS = {"mllama": "AutoModelForImageTextToText"}


def model_class(model_type: str) -> Any:
    """The ``transformers`` auto class used to load ``model_type``: a causal LM, else (vision-language models
    such as Qwen2.5-VL, which have no causal-LM class) an image-text-to-text model."""
    import transformers
    from transformers.models.auto import modeling_auto

    if model_type in _AUTO_CLASS:
        return getattr(transformers, _AUTO_CLASS[model_type])
    if model_type not in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and \
            model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def load_model(model_dir: str | Path, *, device: str = "cpu", multi_gpu: bool = False, dtype: str = "auto",
               trust_remote_code: bool = False) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` (see :func:`model_class`) in eval mode, KV cache off.

    ``multi_gpu`` spreads the layers over the visible GPUs with ``device_map="auto"`` (accelerate);
    otherwise the whole model goes to ``device``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--model_dtype={dtype!r} is not one of: {', '.join(DTYPES)}")
    # use_kernels=False: transformers (with the `kernels` package installed) otherwise fetches compute
    # kernels from the Hugging Face hub on CUDA, code from the network that this tool never runs (and an
    # offline machine fails on: "could not verify publisher trust status", seen with --multi_gpu)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code,
                              "use_safetensors": True, "use_kernels": False}
    if multi_gpu:
        if not torch.cuda.is_available():
            raise ValueError("--multi_gpu needs CUDA devices; none is available here")
        kwargs["device_map"] = "auto"
    target = None if multi_gpu else resolve_device(device)
    try:
        model_type = load_config(model_dir, trust_remote_code).model_type
        model = model_class(model_type).from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ValueError(f"cannot load a causal LM from {str(model_dir)!r}: {str(exc).splitlines()[0]}") from None
    if target is not None:
        model = model.to(target)
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


def _checkpoint_dtype(files: list[Path], config: Any) -> torch.dtype:
    """``dtype="auto"``: the config's ``dtype``/``torch_dtype``, else the first floating tensor's in the shards
    ``files`` (checked already)."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, torch.dtype):
        return stored
    if isinstance(stored, str) and isinstance(DTYPES.get(stored), torch.dtype):
        return DTYPES[stored]
    for path in files:
        for key, entry in check_header(path).items():
            if key != "__metadata__" and entry["dtype"] in ("F32", "F16", "BF16"):
                return TORCH_DTYPES[entry["dtype"]]
    return torch.float32


#: The per-expert Linears :func:`unfuse_experts` makes of a fused expert tensor, in the order transformers
#: concatenates the checkpoint's tensors into it.
_UNFUSED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _checkpoint_names(model: nn.Module, files: list[Path]) -> dict[str, str]:
    """``{parameter name: checkpoint key}`` where transformers renames the checkpoint's tensors when it loads them
    (Mixtral's ``block_sparse_moe.experts.<e>.w1`` for the unfused ``mlp.experts.<e>.gate_proj``; Gemma 3's and
    Llava's ``language_model.*`` for ``model.language_model.*``), from the model's own conversion rules: renamings,
    then the expert converters that fuse per-expert tensors (each mapped to the expert's unfused Linear). Empty
    where transformers has no such rules."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion rules loads checkpoints by their names
        return {}
    transforms = get_model_conversion_mapping(model)
    if not transforms:
        return {}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    names: dict[str, str] = {}
    for path in files:
        for key in check_header(path):
            name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if pattern is not None:
                name = _unfused_expert_name(name, key, pattern, converters)
            if name is not None and name != key:
                names.setdefault(name, key)
    return names


def _unfused_expert_name(fused: str, key: str, pattern: str, converters: list[Any]) -> str | None:
    """The unfused expert Linear's weight for checkpoint ``key``, which a converter's source ``pattern`` renamed to
    the fused tensor ``fused`` (``...experts.gate_up_proj``), or None for a layout :func:`unfuse_experts` does not
    make."""
    head, _, tensor = fused.rpartition(".")
    if tensor not in _UNFUSED_EXPERTS:
        return None
    position = next((c.source_patterns.index(pattern) for c in converters if pattern in c.source_patterns), None)
    expert = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
    if position is None or position >= len(_UNFUSED_EXPERTS[tensor]) or expert is None or not expert.groups():
        return None
    return f"{head}.{expert.group(1)}.{_UNFUSED_EXPERTS[tensor][position]}.weight"


def load_model_on_disk(model_dir: str | Path, offload_folder: str | Path, *, dtype: str = "auto",
                       trust_remote_code: bool = False) -> nn.Module:
    """The model of ``model_dir`` built on the meta device, its weights read from the safetensors shards
    one unit at a time when a stage needs them (changed units go to ``offload_folder``).

    Refused before any weight is read (``ValueError`` naming the reason and ``--offload cpu``): a folder
    without safetensors shards, a model class that cannot be built on the meta device, a checkpoint
    whose tensor names do not match the model's.
    """
    from accelerate import init_empty_weights

    if dtype not in DTYPES:
        raise ValueError(f"--model_dtype={dtype!r} is not one of: {', '.join(DTYPES)}")
    folder = Path(model_dir)
    try:
        files = check_checkpoint(folder)
    except CheckpointError as exc:
        raise ValueError(f"--offload disk reads the layers from the model's safetensors shards: {exc}; use "
                         "--offload cpu, or convert the checkpoint to safetensors") from None
    config = load_config(folder, trust_remote_code)
    torch_dtype = DTYPES[dtype] if dtype != "auto" else _checkpoint_dtype(files, config)
    cls = model_class(config.model_type)
    try:
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a model's own code may raise anything while it is built
        raise ValueError(f"--offload disk: {config.model_type} ({cls.__name__}) cannot be built on the meta "
                         f"device ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); use --offload cpu"
                         ) from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # init_empty_weights re-creates each Parameter, which unties shared ones
    not_meta = [n for n, p in model.named_parameters() if p.device.type != "meta"]
    if not_meta:
        raise ValueError(f"--offload disk: {type(model).__name__} creates parameters outside the meta device "
                         f"(e.g. {not_meta[:3]}); use --offload cpu")
    renamed = _checkpoint_names(model, files)  # before unfusing: transformers reads the fused modules
    unfuse_experts(model)  # the checkpoints hold per-expert Linears (transformers fuses them when loading)
    DiskWeights(files, offload_folder, renamed).attach(model)
    if getattr(model, "can_generate", lambda: False)():
        # as from_pretrained reads it: the folder's generation_config.json, else the one config.json implies
        from transformers import GenerationConfig

        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        else:
            model.generation_config = GenerationConfig.from_pretrained(str(folder), config_file_name="config.json",
                                                                       _from_model_config=True)
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model


__all__ = [
    "BOS_MODES",
    "DTYPES",
    "EMBEDDED_CALIBRATION_TEXT",
    "EMBEDDED_MODEL_DIR",
    "TokenizerInfo",
    "check_model_dir",
    "context_length",
    "encode",
    "load_config",
    "load_model",
    "load_model_on_disk",
    "load_tokenizer",
    "model_class",
    "resolve_device",
]
