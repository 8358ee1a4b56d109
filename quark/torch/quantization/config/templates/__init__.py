"""Model-family knowledge for :class:`~quark.torch.quantization.config.template.LLMTemplate`, as data.

Each family module (``dense``, ``legacy``, ``moe``, ``recent``) exports ``FAMILIES``, a list of
:class:`FamilySpec` dicts of plain strings and lists; ``all_families()`` concatenates them and
``template.py`` turns them into ``LLMTemplate`` objects and algorithm configs. ``schemes`` holds
the built-in scheme table.

Keys of a :class:`FamilySpec`:

``model_type``
    ``config.model_type`` of the Hugging Face checkpoint (``"grok-1"`` keeps its hyphen).
``hf_architecture``
    The ``transformers`` class whose tiny random instance the tests check every name below
    against; ``None`` for remote-code families (names taken from the published model code and
    not verified here).
``decoder_layers`` / ``embedding_layers``
    Path of the ``ModuleList`` of decoder blocks and paths of the input embeddings.
``kv_layers`` / ``q_layers``
    fnmatch patterns of the Linears whose outputs are the key/value cache and the query.
``exclude``
    Default ``Config.exclude`` patterns (``lm_head``, MoE routers, vision towers).
``scaling_layers``
    Scaling groups shared by AWQ, SmoothQuant and AutoSmoothQuant (the ``algorithms`` key says
    which of them the family supports), in the ``scaling_layers`` format of the algorithm
    configs. Names are relative to one decoder block. A group is ``{"prev_op", "layers", "inp",
    "module2inspect"?}``: the output channels of ``prev_op`` (a norm or a Linear) are divided by a
    per-channel scale that multiplies the input channels of every Linear in ``layers``; ``inp``
    names the Linear whose captured input drives the search; ``module2inspect`` is the submodule
    whose output the search compares (absent: the Linears of the group). Where attention and MLP
    run in parallel off one norm (GPT-J, Phi-2, Cohere) that norm's group holds the Linears of
    both. When ``prev_op`` is a fused Linear wider than the layers' input (Phi-3 ``qkv_proj`` ->
    ``o_proj``, ``gate_up_proj`` -> ``down_proj``) only the trailing slice of its output (value /
    up) feeds the layers; matching widths (fused outputs, grouped-query ``v_proj`` -> ``o_proj``)
    is the algorithm's job.
``gptq_modules``
    ``GPTQConfig.inside_layer_modules``: Linears of one block, in true-sequential order.
``rotation_layers``
    ``RotationConfig.scaling_layers``: the norm -> Linear groups of a block into which the
    rotation is fused (same format as ``scaling_layers``).
``algorithms``
    Algorithms this family has data for, among awq, smoothquant, autosmoothquant, gptq, rotation; the others
    find their layers from the model when they run (``recent``'s families have none).
"""

from __future__ import annotations

from typing import Any, TypedDict

from quark.torch.quantization.config.templates import dense, legacy, moe, recent


class ScalingGroup(TypedDict, total=False):
    """One AWQ/SmoothQuant scaling group (see the module docstring)."""

    prev_op: str
    layers: list[str]
    inp: str
    module2inspect: str


class FamilySpec(TypedDict, total=False):
    """The facts of one model family (see the module docstring for each key)."""

    model_type: str
    hf_architecture: str | None
    decoder_layers: str
    embedding_layers: list[str]
    kv_layers: list[str]
    q_layers: list[str]
    exclude: list[str]
    scaling_layers: list[dict[str, Any]]
    gptq_modules: list[str]
    rotation_layers: list[dict[str, Any]]
    algorithms: list[str]


def all_families() -> list[dict[str, Any]]:
    """Every built-in family, in a stable order (dense llama-likes, older layouts, MoE, newer families)."""
    return [*dense.FAMILIES, *legacy.FAMILIES, *moe.FAMILIES, *recent.FAMILIES]


__all__ = ["FamilySpec", "ScalingGroup", "all_families"]
