"""``LLMTemplate``: per-family quantization recipes and the named scheme registry (layer 1).

A template knows one model family's module names (decoder layers, embeddings, key/value and
query projections, default exclusions and the algorithms' scaling groups) and turns a scheme
name plus options into a :class:`~quark.torch.quantization.config.config.Config`::

    from quark.torch import LLMTemplate
    config = LLMTemplate.get("llama").get_config(scheme="fp8", kv_cache_scheme="fp8")

The built-in families are data in :mod:`quark.torch.quantization.config.templates`; the
built-in schemes are the table below. Both registries are process-wide; ``registry_snapshot``
/ ``restore_registry`` (or the ``isolated_registry`` context manager) let tests undo changes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch.nn as nn

from quark.torch.quantization.config.config import (
    AutoSmoothQuantConfig,
    AWQConfig,
    Config,
    GPTQConfig,
    QuantizationConfig,
    QuantizationSpec,
    RotationConfig,
    SmoothQuantConfig,
)
from quark.torch.quantization.config.spec import check_min_kv_scale
from quark.torch.quantization.config.templates import all_families
from quark.torch.quantization.config.templates.schemes import BUILTIN_SCHEMES, fp8_output_per_tensor

logger = logging.getLogger(__name__)

AlgoFallback = Callable[["LLMTemplate", str], Any]

# Algorithm name -> (LLMTemplate field holding its config, config class).
ALGORITHMS: dict[str, tuple[str, type]] = {
    "awq": ("awq_config", AWQConfig),
    "gptq": ("gptq_config", GPTQConfig),
    "smoothquant": ("smoothquant_config", SmoothQuantConfig),
    "autosmoothquant": ("autosmoothquant_config", AutoSmoothQuantConfig),
    "rotation": ("rotation_config", RotationConfig),
}
KV_CACHE_SCHEMES = ("fp8",)
ATTENTION_SCHEMES = ("fp8",)
SMOOTHQUANT_ALPHA = 0.5


# ------------------------------------------------------------------------------------------
# registries
# ------------------------------------------------------------------------------------------
@dataclass
class RegistrySnapshot:
    """A copy of the template, custom scheme and algorithm-fallback registries."""

    templates: dict[str, LLMTemplate]
    schemes: dict[str, QuantizationConfig]
    algo_fallback: AlgoFallback | None


_TEMPLATES: dict[str, LLMTemplate] = {}
_CUSTOM_SCHEMES: dict[str, QuantizationConfig] = {}


def discover_at_run_time(template: LLMTemplate, name: str) -> Any:
    """Default fallback: an algorithm config without layer names.

    The algorithms find the decoder layers and the scaling groups (norm -> q/k/v, v -> o,
    norm -> gate/up, up -> down, ...) from the module graph of the model when they run, so a
    model family without template data still gets AWQ, GPTQ, SmoothQuant or rotation.
    """
    cls = ALGORITHMS[name][1]
    logger.info("template %r has no %s data: scaling groups will be discovered from the model",
                template.model_type, name)
    return cls(alpha=SMOOTHQUANT_ALPHA) if name == "smoothquant" else cls()


_ALGO_FALLBACK: list[AlgoFallback | None] = [discover_at_run_time]


def registry_snapshot() -> RegistrySnapshot:
    """Copy the registries so that :func:`restore_registry` can undo later registrations."""
    return RegistrySnapshot(copy.deepcopy(_TEMPLATES), copy.deepcopy(_CUSTOM_SCHEMES), _ALGO_FALLBACK[0])


def restore_registry(snapshot: RegistrySnapshot) -> None:
    """Put the registries back as they were when ``snapshot`` was taken."""
    _TEMPLATES.clear()
    _TEMPLATES.update(copy.deepcopy(snapshot.templates))
    _CUSTOM_SCHEMES.clear()
    _CUSTOM_SCHEMES.update(copy.deepcopy(snapshot.schemes))
    _ALGO_FALLBACK[0] = snapshot.algo_fallback


@contextmanager
def isolated_registry() -> Iterator[None]:
    """Run a block with the registries restored afterwards (for tests)."""
    snapshot = registry_snapshot()
    try:
        yield
    finally:
        restore_registry(snapshot)


def set_algo_config_fallback(fallback: AlgoFallback | None) -> AlgoFallback | None:
    """Install ``fallback(template, algorithm) -> AlgoConfig | None``, used by ``get_config``
    when a template has no data for a requested algorithm (automatic discovery hooks in here).
    Returns the previous fallback; ``None`` removes it."""
    previous = _ALGO_FALLBACK[0]
    _ALGO_FALLBACK[0] = fallback
    return previous


def parse_algorithm_names(label: str, algorithm: str | Sequence[str] | None, allowed: Sequence[str]) -> list[str]:
    """``"awq,gptq"`` or ``["awq", "gptq"]`` -> ``["awq", "gptq"]`` in order, each in ``allowed``, no repeats.

    ``label`` names the field in error messages (``LLMTemplate.get_config.algorithm``, ``--quant_algo``).
    """
    if algorithm is None:
        return []
    items = algorithm.split(",") if isinstance(algorithm, str) else algorithm
    if not isinstance(items, Sequence) or not all(isinstance(a, str) for a in items):
        raise ValueError(f"{label}={algorithm!r} must be a name, a comma-separated string or a list")
    names = [a.strip().lower() for a in items if a.strip()]
    for name in names:
        if name not in allowed:
            raise ValueError(f"{label}={name!r} is not one of: {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{label}={algorithm!r} names an algorithm twice")
    return names


def _scheme_config(owner: str, field_name: str, scheme: object) -> QuantizationConfig:
    """A fresh ``QuantizationConfig`` for a scheme name or raise listing the known schemes."""
    if isinstance(scheme, str):
        if scheme in BUILTIN_SCHEMES:
            return BUILTIN_SCHEMES[scheme]()
        if scheme in _CUSTOM_SCHEMES:
            return copy.deepcopy(_CUSTOM_SCHEMES[scheme])
    raise ValueError(
        f"{owner}.{field_name}={scheme!r} is not a known scheme; known schemes: "
        f"{', '.join(LLMTemplate.list_schemes())}"
    )


def _str_list(owner: str, field_name: str, value: object, *, allow_none: bool = True) -> list[str] | None:
    """Normalise ``None`` / a string / a sequence of non-empty strings to a list."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{owner}.{field_name}={value!r} must be a list of non-empty strings")
    return list(value)


# ------------------------------------------------------------------------------------------
# LLMTemplate
# ------------------------------------------------------------------------------------------
@dataclass
class LLMTemplate:
    """How to quantize one LLM family: its module names and the algorithm data for it.

    :param model_type: ``config.model_type`` of the family (the registry key).
    :param kv_layer_name: fnmatch patterns of the Linears producing the key/value cache
        (``["*k_proj", "*v_proj"]``); with ``None`` a ``kv_cache_scheme`` request raises.
    :param q_layer_name: pattern(s) of the query projection, quantized by ``attention_scheme``.
    :param exclude_layers: default ``Config.exclude`` patterns (``["lm_head"]``).
    :param awq_config: the family's AWQ config; likewise ``gptq_config``, ``smoothquant_config``,
        ``autosmoothquant_config`` and ``rotation_config`` (``None``: no data for that algorithm).
    :param model_decoder_layers: path of the decoder ``ModuleList`` (``"model.layers"``), filled
        into algorithm configs that leave it unset.
    :param embedding_layers: paths of the input embeddings, filled in the same way.
    """

    model_type: str
    kv_layer_name: list[str] | None = None
    q_layer_name: str | list[str] | None = None
    exclude_layers: list[str] | None = None
    awq_config: AWQConfig | None = None
    gptq_config: GPTQConfig | None = None
    smoothquant_config: SmoothQuantConfig | None = None
    autosmoothquant_config: AutoSmoothQuantConfig | None = None
    rotation_config: RotationConfig | None = None
    model_decoder_layers: str | None = None
    embedding_layers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = "LLMTemplate"
        if not isinstance(self.model_type, str) or not self.model_type:
            raise ValueError(f"{owner}.model_type={self.model_type!r} must be a non-empty string")
        self.kv_layer_name = _str_list(owner, "kv_layer_name", self.kv_layer_name)
        self.q_layer_name = _str_list(owner, "q_layer_name", self.q_layer_name)
        self.exclude_layers = _str_list(owner, "exclude_layers", self.exclude_layers) or []
        self.embedding_layers = (
            _str_list(owner, "embedding_layers", self.embedding_layers, allow_none=False) or []
        )
        if self.model_decoder_layers is not None and (
            not isinstance(self.model_decoder_layers, str) or not self.model_decoder_layers
        ):
            raise ValueError(
                f"{owner}.model_decoder_layers={self.model_decoder_layers!r} must be a non-empty "
                "string or None"
            )
        for attr, cls in ALGORITHMS.values():
            value = getattr(self, attr)
            if value is not None and not isinstance(value, cls):
                raise ValueError(f"{owner}.{attr}={value!r} must be a {cls.__name__} or None")

    # ---------------------------------------------------------------- registry
    @classmethod
    def list_available(cls) -> list[str]:
        """Model types of the registered templates, in registration order."""
        return list(_TEMPLATES)

    @classmethod
    def get(cls, model_type: str) -> LLMTemplate:
        """The registered template for ``model_type`` (``model.config.model_type``, see
        :meth:`get_model_type`)."""
        if model_type not in _TEMPLATES:
            raise ValueError(
                f"LLMTemplate.get: model_type={model_type!r} has no template; available templates: "
                f"{', '.join(_TEMPLATES)}. Register one with LLMTemplate.register_template."
            )
        return _TEMPLATES[model_type]

    @classmethod
    def register_template(cls, template: LLMTemplate, overwrite: bool = False) -> None:
        """Register ``template`` under its ``model_type``. Registering an equal template again is
        a no-op; a different one under a taken name raises unless ``overwrite=True``."""
        if not isinstance(template, LLMTemplate):
            raise ValueError(f"LLMTemplate.register_template: template={template!r} must be an LLMTemplate")
        existing = _TEMPLATES.get(template.model_type)
        if existing is not None and existing != template and not overwrite:
            raise ValueError(
                f"LLMTemplate.register_template: a different template is already registered for "
                f"model_type={template.model_type!r}; pass overwrite=True to replace it"
            )
        if existing is not None and existing != template:
            logger.info("Replacing the LLMTemplate registered for %r", template.model_type)
        _TEMPLATES[template.model_type] = template

    @classmethod
    def register_scheme(cls, name: str, config: QuantizationConfig, overwrite: bool = False) -> None:
        """Register ``config`` as scheme ``name`` for ``get_config``'s ``scheme``, ``layer_config``
        and ``layer_type_config``. Built-in names cannot be replaced; another custom scheme of the
        same name can with ``overwrite=True``."""
        owner = "LLMTemplate.register_scheme"
        if not isinstance(name, str) or not name:
            raise ValueError(f"{owner}: name={name!r} must be a non-empty string")
        if not isinstance(config, QuantizationConfig):
            raise ValueError(f"{owner}: config={config!r} must be a QuantizationConfig")
        if name in BUILTIN_SCHEMES:
            raise ValueError(
                f"{owner}: name={name!r} is a built-in scheme and cannot be replaced; "
                f"built-in schemes: {', '.join(BUILTIN_SCHEMES)}"
            )
        existing = _CUSTOM_SCHEMES.get(name)
        if existing is not None and existing != config and not overwrite:
            raise ValueError(
                f"{owner}: a different scheme is already registered as {name!r}; "
                "pass overwrite=True to replace it"
            )
        _CUSTOM_SCHEMES[name] = copy.deepcopy(config)

    @classmethod
    def list_schemes(cls) -> list[str]:
        """Built-in scheme names, then the registered ones."""
        return [*BUILTIN_SCHEMES, *_CUSTOM_SCHEMES]

    @staticmethod
    def get_model_type(model_or_config: Any) -> str:
        """The template key of a model or its config: ``config.model_type``, else
        ``config.architectures[0]``. Accepts a model (with ``.config``), a config or a dict."""
        config = getattr(model_or_config, "config", model_or_config)
        if isinstance(config, Mapping):
            model_type, architectures = config.get("model_type"), config.get("architectures")
        else:
            model_type = getattr(config, "model_type", None)
            architectures = getattr(config, "architectures", None)
        if isinstance(model_type, str) and model_type:
            return model_type
        if architectures and isinstance(architectures[0], str):
            return architectures[0]
        raise ValueError(
            f"LLMTemplate.get_model_type: {type(model_or_config).__name__} has neither "
            "config.model_type nor config.architectures"
        )

    # ---------------------------------------------------------------- config building
    def get_config(
        self,
        scheme: str,
        algorithm: str | Sequence[str] | None = None,
        kv_cache_scheme: str | None = None,
        min_kv_scale: float = 0.0,
        attention_scheme: str | None = None,
        layer_config: Mapping[str, str] | None = None,
        layer_type_config: Mapping[type[nn.Module], str] | None = None,
        exclude_layers: Sequence[str] | None = None,
    ) -> Config:
        """Build a ``Config`` for this family.

        :param scheme: global scheme name (:meth:`list_schemes`).
        :param algorithm: ``"awq"``, ``"gptq"``, ``"smoothquant"``, ``"autosmoothquant"``,
            ``"rotation"``, a comma-separated string or a list of them; their configs go to
            ``Config.algo_config`` in the given order.
        :param kv_cache_scheme: ``"fp8"``: every ``kv_layer_name`` pattern gets an entry in both
            ``layer_quant_config`` and ``kv_cache_quant_config`` whose ``output_tensors`` is fp8 e4m3
            per-tensor static and whose weight / input specs are the ones the layer would get
            otherwise (a ``layer_config`` pattern matching the kv pattern, else the
            ``layer_type_config`` entry for ``nn.Linear``, else the global scheme; none when an
            ``exclude`` pattern matches the kv pattern).
        :param min_kv_scale: lower bound of the kv-cache scales (``Config.min_kv_scale``).
        :param attention_scheme: ``"fp8"`` quantizes attention's query and probabilities: each
            ``q_layer_name`` Linear gets fp8 e4m3 per-tensor static ``output_tensors`` (its weight /
            input resolved as for the kv layers) and ``Config.softmax_quant_spec`` (the softmax
            output) is fp8 e4m3 per-tensor static. Keys and values come from ``kv_cache_scheme``.
        :param layer_config: fnmatch name pattern -> scheme name (``layer_quant_config``).
        :param layer_type_config: module class -> scheme name (``layer_type_quant_config``).
        :param exclude_layers: ``None`` keeps the template's exclusions; a list replaces them.
        """
        owner = f"LLMTemplate({self.model_type!r}).get_config"
        global_config = _scheme_config(owner, "scheme", scheme)
        algorithms = self._parse_algorithms(owner, algorithm)
        for name, value, allowed in (
            ("kv_cache_scheme", kv_cache_scheme, KV_CACHE_SCHEMES),
            ("attention_scheme", attention_scheme, ATTENTION_SCHEMES),
        ):
            if value is not None and value not in allowed:
                raise ValueError(
                    f"{owner}.{name}={value!r} is not supported; allowed: {', '.join(allowed)} or None"
                )
        min_kv_scale = check_min_kv_scale(owner, min_kv_scale)

        exclude = (
            list(self.exclude_layers or [])
            if exclude_layers is None
            else _str_list(owner, "exclude_layers", exclude_layers, allow_none=False)
        )
        layer_quant: dict[str, QuantizationConfig] = {}
        for pattern, name in (layer_config or {}).items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"{owner}.layer_config key {pattern!r} must be a non-empty name pattern")
            layer_quant[pattern] = _scheme_config(owner, f"layer_config[{pattern!r}]", name)
        layer_type_quant: dict[type[nn.Module], QuantizationConfig] = {}
        for module_type, name in (layer_type_config or {}).items():
            if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
                raise ValueError(
                    f"{owner}.layer_type_config key {module_type!r} must be an nn.Module subclass"
                )
            layer_type_quant[module_type] = _scheme_config(
                owner, f"layer_type_config[{module_type.__name__}]", name
            )

        kv_cache_quant: dict[str, QuantizationConfig] = {}
        base = _BaseResolver(global_config, layer_quant, layer_type_quant, exclude or [])
        if kv_cache_scheme is not None:
            if not self.kv_layer_name:
                raise ValueError(
                    f"{owner}.kv_cache_scheme={kv_cache_scheme!r} needs the template's kv_layer_name, "
                    f"which is empty for {self.model_type!r}"
                )
            for pattern in self.kv_layer_name:
                entry = base.with_output(pattern, fp8_output_per_tensor())
                layer_quant[pattern] = entry
                kv_cache_quant[pattern] = copy.deepcopy(entry)
        softmax_spec = None
        if attention_scheme is not None:
            softmax_spec = fp8_output_per_tensor()
            for pattern in self.q_layer_name or []:
                layer_quant[pattern] = base.with_output(pattern, fp8_output_per_tensor())

        return Config(
            global_quant_config=global_config,
            layer_type_quant_config=layer_type_quant,
            layer_quant_config=layer_quant,
            kv_cache_quant_config=kv_cache_quant,
            exclude=exclude,
            algo_config=[self._algo_config(owner, name) for name in algorithms] or None,
            min_kv_scale=min_kv_scale,
            softmax_quant_spec=softmax_spec,
        )

    def _parse_algorithms(self, owner: str, algorithm: str | Sequence[str] | None) -> list[str]:
        return parse_algorithm_names(f"{owner}.algorithm", algorithm, tuple(ALGORITHMS))

    def _algo_config(self, owner: str, name: str) -> Any:
        """A copy of the template's config for ``name``, with decoder/embedding paths filled."""
        attr, cls = ALGORITHMS[name]
        config = getattr(self, attr)
        if config is None and _ALGO_FALLBACK[0] is not None:
            config = _ALGO_FALLBACK[0](self, name)
        if config is None:
            raise ValueError(
                f"{owner}.algorithm={name!r}: the {self.model_type!r} template has no {name} "
                f"data; give the template a {cls.__name__} ({attr}=...) or pick another algorithm"
            )
        config = copy.deepcopy(config)
        updates: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(config)}
        if "model_decoder_layers" in names and not config.model_decoder_layers and self.model_decoder_layers:
            updates["model_decoder_layers"] = self.model_decoder_layers
        if "embedding_layers" in names and not config.embedding_layers and self.embedding_layers:
            updates["embedding_layers"] = list(self.embedding_layers)
        return dataclasses.replace(config, **updates) if updates else config


@dataclass
class _BaseResolver:
    """Which weight / input specs a layer matched by a template pattern gets before its output
    is set (kv cache, query): see ``LLMTemplate.get_config``."""

    global_config: QuantizationConfig
    layer_quant: dict[str, QuantizationConfig]
    layer_type_quant: dict[type[nn.Module], QuantizationConfig]
    exclude: list[str]

    def with_output(self, pattern: str, output: QuantizationSpec) -> QuantizationConfig:
        if any(fnmatchcase(pattern, ex) for ex in self.exclude):
            return QuantizationConfig(output_tensors=output)
        base = self.layer_quant.get(pattern)
        if base is None:
            base = next((c for p, c in self.layer_quant.items() if fnmatchcase(pattern, p)), None)
        if base is None:
            base = self.layer_type_quant.get(nn.Linear, self.global_config)
        return QuantizationConfig(
            input_tensors=copy.deepcopy(base.input_tensors),
            weight=copy.deepcopy(base.weight),
            output_tensors=output,
        )


# ------------------------------------------------------------------------------------------
# built-in templates from the family data
# ------------------------------------------------------------------------------------------
def template_from_family(data: Mapping[str, Any]) -> LLMTemplate:
    """Build an ``LLMTemplate`` from one :class:`~.templates.FamilySpec` dict."""
    decoder, embeddings = data["decoder_layers"], list(data["embedding_layers"])
    algorithms = set(data.get("algorithms", []))
    unknown = algorithms - set(ALGORITHMS)
    if unknown:
        raise ValueError(
            f"family {data['model_type']!r}: algorithms {sorted(unknown)} are not one of "
            f"{', '.join(ALGORITHMS)}"
        )
    groups = copy.deepcopy(data.get("scaling_layers"))
    common = {"model_decoder_layers": decoder, "embedding_layers": embeddings}
    configs: dict[str, Any] = {}
    if "awq" in algorithms:
        configs["awq_config"] = AWQConfig(scaling_layers=groups, **common)
    if "smoothquant" in algorithms:
        configs["smoothquant_config"] = SmoothQuantConfig(
            alpha=SMOOTHQUANT_ALPHA, scaling_layers=copy.deepcopy(groups), **common
        )
    if "autosmoothquant" in algorithms:
        configs["autosmoothquant_config"] = AutoSmoothQuantConfig(
            scaling_layers=copy.deepcopy(groups), **common
        )
    if "gptq" in algorithms:
        configs["gptq_config"] = GPTQConfig(inside_layer_modules=list(data["gptq_modules"]), **common)
    if "rotation" in algorithms:
        configs["rotation_config"] = RotationConfig(
            random=False, scaling_layers=copy.deepcopy(data["rotation_layers"]), **common
        )
    return LLMTemplate(
        model_type=data["model_type"],
        kv_layer_name=list(data["kv_layers"]),
        q_layer_name=list(data["q_layers"]),
        exclude_layers=list(data["exclude"]),
        model_decoder_layers=decoder,
        embedding_layers=embeddings,
        **configs,
    )


for _family in all_families():
    LLMTemplate.register_template(template_from_family(_family))

__all__ = [
    "ALGORITHMS",
    "BUILTIN_SCHEMES",
    "LLMTemplate",
    "RegistrySnapshot",
    "isolated_registry",
    "parse_algorithm_names",
    "registry_snapshot",
    "restore_registry",
    "set_algo_config_fallback",
    "template_from_family",
]
