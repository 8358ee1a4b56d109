"""Algorithm configurations (layer 1): SmoothQuant, AutoSmoothQuant, AWQ, GPTQ, rotation, QuaRot.

Public import path: ``quark.torch.quantization.config.config``. Each config is plain data,
validated on construction; ``to_dict`` / ``from_dict`` and the two file loaders read and write
JSON only (never ``eval`` or pickle), dispatching on the ``"name"`` key.

Pre-quantization optimizations (weights change, dtypes do not) subclass ``PreQuantOptConfig``;
quantization algorithms (weights and scales change) subclass ``AlgoConfig``. Both may appear in
``Config.algo_config``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from quark.torch.quantization.config.spec import check_known_keys, check_real, short_repr

logger = logging.getLogger(__name__)

# Keys a scaling-layer entry may carry (AWQ / SmoothQuant / rotation groups).
SCALING_LAYER_KEYS: tuple[str, ...] = (
    "prev_op", "layers", "inp", "module2inspect", "has_kwargs", "condition", "help",
)
SCALE_LOSSES: tuple[str, ...] = ("MSE", "MAE")


class ConfigBase(ABC):  # noqa: B024 (an abstract marker base, as in Quark)
    """Base of every configuration object of this package."""


class AlgoConfigBase(ConfigBase):
    """Base of algorithm configs: serialisation shared by all of them."""

    names: ClassVar[tuple[str, ...]] = ()

    #: quark-torch's own fields and their defaults: written by ``to_dict`` only when changed.
    extension_defaults: ClassVar[dict[str, object]] = {}

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (extension fields only when not at their default); copies."""
        data = json.loads(json.dumps(dataclasses.asdict(self)))  # type: ignore[call-overload]
        for key, default in self.extension_defaults.items():
            if data.get(key) == default:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlgoConfigBase:
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        data = check_known_keys(cls.__name__, data, known)
        return cls(**data)

    def _check_name(self) -> None:
        name = getattr(self, "name", None)
        if name not in self.names:
            raise ValueError(f"{type(self).__name__}.name={name!r} is not one of: {', '.join(self.names)}")


class PreQuantOptConfig(AlgoConfigBase):
    """Pre-quantization optimization: changes weight values, not data types (SmoothQuant, rotation)."""


class AlgoConfig(AlgoConfigBase):
    """Quantization algorithm: changes weights and their quantization parameters (AWQ, GPTQ)."""


# ----------------------------------------------------------------------------- field checks
def _check_str(owner: str, name: str, value: object, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise ValueError(f"{owner}.{name}={value!r} must be a str" + (" or None" if optional else ""))


def _check_str_list(owner: str, name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{owner}.{name}={value!r} must be a list of str or None")


def _check_bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name}={value!r} must be True or False")


def _check_scaling_layers(owner: str, value: object) -> None:
    """Each entry: a dict with ``prev_op`` (str) and ``layers`` (list of str), known keys only."""
    if value is None:
        return
    if not isinstance(value, list):
        raise ValueError(f"{owner}.scaling_layers={value!r} must be a list of dicts or None")
    for i, entry in enumerate(value):
        where = f"{owner}.scaling_layers[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}={entry!r} must be a dict with keys {', '.join(SCALING_LAYER_KEYS)}")
        unknown = [k for k in entry if k not in SCALING_LAYER_KEYS]
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(SCALING_LAYER_KEYS)}")
        if not isinstance(entry.get("prev_op"), str):
            raise ValueError(f"{where}.prev_op={entry.get('prev_op')!r} is required and must be a str")
        layers = entry.get("layers")
        if not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers):
            raise ValueError(f"{where}.layers={layers!r} is required and must be a non-empty list of str")
        for key in ("inp", "module2inspect", "condition", "help"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise ValueError(f"{where}.{key}={entry[key]!r} must be a str or None")
        if "has_kwargs" in entry and not isinstance(entry["has_kwargs"], bool):
            raise ValueError(f"{where}.has_kwargs={entry['has_kwargs']!r} must be True or False")


# Upper bounds of numeric algorithm fields: beyond them a run is absurd (hours per layer) or the
# algorithm degenerates (GPTQ dampening above the mean diagonal, smoothing scales clamped above 1).
MAX_SCALE_CLAMP_MIN = 1.0
MAX_DAMP_PERCENT = 1.0
MAX_CLIP_SEARCH_STEPS = 1000


# ----------------------------------------------------------------------------- configs
@dataclass(eq=True)
class SmoothQuantConfig(PreQuantOptConfig):
    """SmoothQuant: migrate activation outliers into weights, ``s = max|X|^α / max|W|^(1-α)``.

    :param str name: ``"smoothquant"`` (``"smooth"`` is the name Quark checkpoints record).
    :param float alpha: migration strength in [0, 1]. Default 1.
    :param float scale_clamp_min: lower clamp of the smoothing scales (> 0). Default 1e-3.
    :param scaling_layers: groups ``{"prev_op", "layers", "inp", "module2inspect", ...}``.
    :param str model_decoder_layers: path of the decoder ``ModuleList`` (e.g. ``"model.layers"``).
    :param embedding_layers: names of the embedding modules.
    """

    names: ClassVar[tuple[str, ...]] = ("smoothquant", "smooth")

    name: str = "smoothquant"
    alpha: float = 1
    scale_clamp_min: float = 1e-3
    scaling_layers: list[dict[str, Any]] | None = None
    model_decoder_layers: str | None = None
    embedding_layers: list[str] | None = None

    def __post_init__(self) -> None:
        owner = "SmoothQuantConfig"
        self._check_name()
        check_real(owner, "alpha", self.alpha, low=0.0, high=1.0)
        check_real(owner, "scale_clamp_min", self.scale_clamp_min, low=0.0, high=MAX_SCALE_CLAMP_MIN, low_open=True)
        _check_scaling_layers(owner, self.scaling_layers)
        _check_str(owner, "model_decoder_layers", self.model_decoder_layers)
        _check_str_list(owner, "embedding_layers", self.embedding_layers)


@dataclass(eq=True)
class AutoSmoothQuantConfig(PreQuantOptConfig):
    """AutoSmoothQuant: SmoothQuant with α searched per scaling group by output loss.

    :param str compute_scale_loss: ``"MSE"`` or ``"MAE"``. Default ``"MSE"``.
    """

    names: ClassVar[tuple[str, ...]] = ("autosmoothquant",)

    name: str = "autosmoothquant"
    scaling_layers: list[dict[str, Any]] | None = None
    compute_scale_loss: str = "MSE"
    model_decoder_layers: str | None = None
    embedding_layers: list[str] | None = None

    def __post_init__(self) -> None:
        owner = "AutoSmoothQuantConfig"
        self._check_name()
        loss = self.compute_scale_loss
        if not isinstance(loss, str) or loss.upper() not in SCALE_LOSSES:
            raise ValueError(f"{owner}.compute_scale_loss={self.compute_scale_loss!r} is not one of: "
                             f"{', '.join(SCALE_LOSSES)}")
        self.compute_scale_loss = self.compute_scale_loss.upper()
        _check_scaling_layers(owner, self.scaling_layers)
        _check_str(owner, "model_decoder_layers", self.model_decoder_layers)
        _check_str_list(owner, "embedding_layers", self.embedding_layers)


@dataclass(eq=True)
class AWQConfig(AlgoConfig):
    """Activation-aware Weight Quantization: per-channel scales searched to minimise block error.

    ``scaling_layers=None`` lets the algorithm take the groups from the model's template or
    discover them.

    :param bool clip_in_scale_search: quark-torch extension: each candidate scale is judged with the
        weights clipped as the clipping search would clip them under that scale, so the scale and
        the clipping are chosen together (SmolLM2-135M int4 g64, 128 calibration samples: test
        27.48 -> 26.56, validation 23.91 -> 22.99; about 1.7x the search time). ``False`` is the
        reference's order: candidates judged with min-max ranges, clipping searched once after.

    Extension fields are left out of ``to_dict`` at their defaults, so saved configs keep the
    reference's keys.
    """

    names: ClassVar[tuple[str, ...]] = ("awq",)
    extension_defaults: ClassVar[dict[str, object]] = {"clip_in_scale_search": True}

    name: str = "awq"
    scaling_layers: list[dict[str, Any]] | None = None
    model_decoder_layers: str | None = None
    embedding_layers: list[str] | None = None
    clip_in_scale_search: bool = True

    def __post_init__(self) -> None:
        owner = "AWQConfig"
        _check_bool(owner, "clip_in_scale_search", self.clip_in_scale_search)
        self._check_name()
        _check_scaling_layers(owner, self.scaling_layers)
        _check_str(owner, "model_decoder_layers", self.model_decoder_layers)
        _check_str_list(owner, "embedding_layers", self.embedding_layers)


@dataclass(eq=True)
class GPTQConfig(AlgoConfig):
    """GPTQ: column-by-column weight quantization with Hessian-based error compensation.

    :param float damp_percent: diagonal dampening as a fraction of the mean diagonal (> 0).
    :param bool desc_act: quantize columns in order of decreasing activation magnitude.
    :param bool static_groups: group parameters computed before the column reordering.
    :param bool true_sequential: quantize sub-layer groups in order within a decoder layer.
    :param inside_layer_modules: Linear names (relative to a decoder layer), in sequential order.
    :param int clip_search_steps: quark-torch extension: before quantizing, the range of each group
        (per-channel: each row) of an integer weight is also tried shrunk by this many ratios down
        to 0.5 and the one with the smallest Hessian-weighted rounding error is kept (SmolLM2-135M
        int4 g64: perplexity 28.55 -> 26.28); per-tensor and FP8 weights keep min-max ranges.
        ``0`` is the reference behaviour (min-max ranges).
    :param bool match_float_outputs: quark-torch extension (off by default): each linear targets the
        float model's outputs instead of the float weights applied to the quantized model's inputs
        (GPTAQ's asymmetric calibration; one extra float forward per layer and batch). Measured on
        SmolLM2-135M int4 g64: test 26.28 -> 26.13 but validation 22.41 -> 22.77, per-channel and
        fp8 slightly worse, hence off.

    Extension fields are left out of ``to_dict`` at their defaults, so saved configs keep the
    reference's keys.
    """

    names: ClassVar[tuple[str, ...]] = ("gptq",)
    extension_defaults: ClassVar[dict[str, object]] = {"clip_search_steps": 40, "match_float_outputs": False}

    name: str = "gptq"
    damp_percent: float = 0.01
    desc_act: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    inside_layer_modules: list[str] | None = None
    model_decoder_layers: str | None = None
    embedding_layers: list[str] | None = None
    clip_search_steps: int = 40
    match_float_outputs: bool = False

    def __post_init__(self) -> None:
        owner = "GPTQConfig"
        _check_bool(owner, "match_float_outputs", self.match_float_outputs)
        steps = self.clip_search_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_CLIP_SEARCH_STEPS:
            raise ValueError(f"{owner}.clip_search_steps={short_repr(steps)} must be an integer in "
                             f"[0, {MAX_CLIP_SEARCH_STEPS}] (0: min-max ranges)")
        self._check_name()
        check_real(owner, "damp_percent", self.damp_percent, low=0.0, high=MAX_DAMP_PERCENT, low_open=True)
        for flag in ("desc_act", "static_groups", "true_sequential"):
            _check_bool(owner, flag, getattr(self, flag))
        _check_str_list(owner, "inside_layer_modules", self.inside_layer_modules)
        _check_str(owner, "model_decoder_layers", self.model_decoder_layers)
        _check_str_list(owner, "embedding_layers", self.embedding_layers)


@dataclass(eq=True)
class RotationConfig(PreQuantOptConfig):
    """Hadamard rotation of the residual stream, fused into the neighbouring weights.

    :param bool random: use a randomised Hadamard matrix.
    :param scaling_layers: the norm/Linear groups the rotation is fused into.
    """

    names: ClassVar[tuple[str, ...]] = ("rotation",)

    name: str = "rotation"
    random: bool = False
    scaling_layers: list[dict[str, Any]] | None = None
    model_decoder_layers: str | None = None
    embedding_layers: list[str] | None = None

    def __post_init__(self) -> None:
        owner = "RotationConfig"
        self._check_name()
        _check_bool(owner, "random", self.random)
        _check_scaling_layers(owner, self.scaling_layers)
        _check_str(owner, "model_decoder_layers", self.model_decoder_layers)
        _check_str_list(owner, "embedding_layers", self.embedding_layers)


@dataclass(eq=True)
class QuaRotConfig(PreQuantOptConfig):
    """QuaRot: rotations R1 (residual), R2 (per head, v/o), online R3 (keys) and R4 (down_proj input).

    :param bool random: random Hadamard for R1. :param bool random2: random Hadamard for R2.
    :param bool had: perform the online Hadamards R3/R4.
    :param optimized_rotation_path: file with learned R1/R2 (JSON or safetensors, never pickle).
    :param bool kv_cache_quant: KV cache is quantized (R3 applied only then).
    :param bool act_quant: activations are quantized.
    :param str backbone / model_decoder_layers / v_proj / o_proj / self_attn / mlp: module paths.
    """

    names: ClassVar[tuple[str, ...]] = ("quarot",)

    name: str = "quarot"
    random: bool = False
    random2: bool = False
    scaling_layers: list[dict[str, Any]] | None = None
    had: bool = True
    optimized_rotation_path: str | None = None
    kv_cache_quant: bool = True
    act_quant: bool = True
    backbone: str = "model"
    model_decoder_layers: str = "model.layers"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    self_attn: str = "self_attn"
    mlp: str = "mlp"

    def __post_init__(self) -> None:
        owner = "QuaRotConfig"
        self._check_name()
        for flag in ("random", "random2", "had", "kv_cache_quant", "act_quant"):
            _check_bool(owner, flag, getattr(self, flag))
        _check_scaling_layers(owner, self.scaling_layers)
        _check_str(owner, "optimized_rotation_path", self.optimized_rotation_path)
        for path in ("backbone", "model_decoder_layers", "v_proj", "o_proj", "self_attn", "mlp"):
            _check_str(owner, path, getattr(self, path), optional=False)


ALGO_CONFIG_CLASSES: tuple[type[AlgoConfigBase], ...] = (
    SmoothQuantConfig, AutoSmoothQuantConfig, AWQConfig, GPTQConfig, RotationConfig, QuaRotConfig,
)
_BY_NAME: dict[str, type[AlgoConfigBase]] = {n: c for c in ALGO_CONFIG_CLASSES for n in c.names}
_ALL_NAMES: list[str] = list(_BY_NAME)


def algo_config_from_dict(data: dict[str, Any]) -> AlgoConfigBase:
    """Build the algorithm config named by ``data["name"]`` (unknown names list the known ones)."""
    if not isinstance(data, dict):
        raise ValueError(f"algo_config entry must be a dict with a 'name' key, got {data!r}")
    name = data.get("name")
    cls = _BY_NAME.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"algo_config name={name!r} is not one of: {', '.join(_ALL_NAMES)}")
    return cls.from_dict(data)


def _read_json(file_path: str | Path) -> dict[str, Any]:
    path = Path(file_path)
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with a 'name' key, got {type(data).__name__}")
    return data


def load_quant_algo_config_from_file(file_path: str | Path) -> AlgoConfigBase:
    """Load an algorithm config (AWQ, GPTQ, SmoothQuant, ...) from a JSON file."""
    config = algo_config_from_dict(_read_json(file_path))
    logger.info("loaded %s from %s", type(config).__name__, file_path)
    return config


def load_pre_optimization_config_from_file(file_path: str | Path) -> PreQuantOptConfig:
    """Load a pre-quantization optimization config (SmoothQuant, rotation, ...) from a JSON file."""
    config = algo_config_from_dict(_read_json(file_path))
    if not isinstance(config, PreQuantOptConfig):
        allowed = [n for c in ALGO_CONFIG_CLASSES if issubclass(c, PreQuantOptConfig) for n in c.names]
        raise ValueError(f"{file_path}: name={config.name!r} is not a pre-quantization optimization; "  # type: ignore[attr-defined]
                         f"allowed: {', '.join(allowed)}")
    return config


__all__ = [
    "ALGO_CONFIG_CLASSES", "AWQConfig", "AlgoConfig", "AlgoConfigBase", "AutoSmoothQuantConfig",
    "ConfigBase", "GPTQConfig", "PreQuantOptConfig", "QuaRotConfig", "RotationConfig",
    "SmoothQuantConfig", "algo_config_from_dict", "load_pre_optimization_config_from_file",
    "load_quant_algo_config_from_file",
]
