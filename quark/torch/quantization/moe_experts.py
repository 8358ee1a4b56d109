"""Fused mixture-of-experts modules unfused into per-expert ``nn.Linear`` layers (layer 6).

In ``transformers`` 5 the experts of Mixtral, Qwen2-MoE (Qwen1.5-MoE) and similar models are one
fused module holding 3-D parameters (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), which
the quantizer (``nn.Linear`` only) cannot see. :func:`unfuse_experts` replaces each such module by
an equivalent :class:`UnfusedExperts` whose experts are ordinary ``nn.Linear`` layers
(``experts.<e>.gate_proj/up_proj/down_proj``), with the same routing loop, so that the experts
are quantized, calibrated and exported like every other Linear. The outputs are unchanged (same
arithmetic per expert). Layouts this module does not recognise (transposed, interleaved or
biased expert weights) are left fused and logged. Llama 4's experts, which run every token (already
weighted by the router) as ``x @ W`` with ``gate_up_proj [E, H, 2I]``, become
:class:`DenseUnfusedExperts`; GPT-OSS's (interleaved gate/up, biases, clamped SwiGLU) become
:class:`ClampedSwigluExpert` modules. DBRX's ``experts.mlp.w1/v1/w2`` (2-D, ``[E * I, H]``) are unfused the
same way. Checkpoints we write hold these per-expert Linears, so
loading one (``ModelImporter``, transformers through ``_map_to_quark``) unfuses first.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

logger = logging.getLogger(__name__)


class ExpertMLP(nn.Module):
    """One gated expert: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ClampedSwigluExpert(nn.Module):
    """One GPT-OSS expert: ``down_proj((clamp(up, ±limit) + 1) * g * sigmoid(alpha * g))`` with
    ``g = clamp(gate, max=limit)``; every projection has a bias."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, alpha: float,
                 limit: float) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.alpha = alpha
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


class UnfusedExperts(nn.ModuleList):
    """Per-expert Linears with the routed forward of ``transformers``' fused experts modules:
    ``forward(hidden_states [tokens, H], top_k_index [tokens, k], top_k_weights [tokens, k])``.

    With ``route_all_tokens`` (set by :func:`all_experts_see_every_token` during calibration)
    every expert runs on every token, so that its observers see data even when the router never
    picks it; the output still combines only the routed tokens.
    """

    route_all_tokens: bool = False

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == index)
            if self.route_all_tokens:
                every = expert(hidden_states)
                if token_idx.numel() == 0:
                    continue
                states = every[token_idx] * top_k_weights[token_idx, slot, None]
            else:
                if token_idx.numel() == 0:
                    continue
                states = expert(hidden_states[token_idx]) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, states.to(out.dtype))
        return out.reshape(shape)


class DenseUnfusedExperts(nn.ModuleList):
    """Per-expert Linears standing in for experts that run every token (Llama 4's ``Llama4TextExperts``):
    ``forward(hidden_states [E * T, H])``, expert ``e`` taking rows ``e * T`` to ``(e + 1) * T`` (the
    caller has already weighted them by the router's scores), outputs in the same order."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        per_expert = hidden_states.view(len(self), -1, hidden_states.shape[-1])
        return torch.cat([expert(per_expert[e]) for e, expert in enumerate(self)]).view(-1, per_expert.shape[-1])


@contextmanager
def all_experts_see_every_token(model: nn.Module) -> Iterator[int]:
    """Within the block, every :class:`UnfusedExperts` runs each expert on all tokens; yields their count."""
    blocks = [m for m in model.modules() if isinstance(m, UnfusedExperts)]
    for block in blocks:
        block.route_all_tokens = True
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            block.route_all_tokens = False


def _fused_layout_ok(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not isinstance(getattr(module, "act_fn", None), nn.Module):
        return False
    experts, two_i, hidden = gate_up.shape
    layout_flags = (getattr(module, "has_bias", False), getattr(module, "is_transposed", False),
                    not getattr(module, "is_concatenated", True), not getattr(module, "has_gate", True),
                    getattr(module, "has_post_expert_norm", False))
    return not any(layout_flags) and two_i % 2 == 0 and tuple(down.shape) == (experts, hidden, two_i // 2)


def _dense_layout_ok(module: nn.Module) -> bool:
    """Llama 4: ``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]`` applied as ``x @ W`` to every token
    (``forward(hidden_states)`` alone: no routing inside the module)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return False
    if gate_up.dim() != 3 or down.dim() != 3 or not isinstance(getattr(module, "act_fn", None), nn.Module):
        return False
    if list(inspect.signature(type(module).forward).parameters)[1:] != ["hidden_states"]:
        return False
    experts, hidden, two_i = gate_up.shape
    return two_i % 2 == 0 and tuple(down.shape) == (experts, two_i // 2, hidden) and \
        not any(isinstance(getattr(module, n, None), nn.Parameter) for n in ("gate_up_proj_bias", "down_proj_bias"))


def _gpt_oss_layout_ok(module: nn.Module) -> bool:
    """GPT-OSS: ``gate_up_proj [E, H, 2I]`` with gate and up interleaved (even / odd columns), biases, ``x @ W``,
    the clamped SwiGLU of ``alpha`` and ``limit``, routed as Mixtral's (``forward(hidden, indices, weights)``)."""
    names = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    params = [getattr(module, n, None) for n in names]
    if not all(isinstance(p, nn.Parameter) for p in params):
        return False
    if not all(isinstance(getattr(module, n, None), (int, float)) for n in ("alpha", "limit")):
        return False
    gate_up, gate_up_bias, down, down_bias = params
    if gate_up.dim() != 3 or down.dim() != 3:
        return False
    experts, hidden, two_i = gate_up.shape
    return two_i % 2 == 0 and tuple(gate_up_bias.shape) == (experts, two_i) and \
        tuple(down.shape) == (experts, two_i // 2, hidden) and tuple(down_bias.shape) == (experts, hidden)


def _dbrx_layout_ok(module: nn.Module) -> bool:
    """DBRX: ``experts.mlp.{w1, v1, w2}`` each ``[E * I, H]``; down is ``w2[e].T``."""
    mlp = getattr(module, "mlp", None)
    params = [getattr(mlp, n, None) for n in ("w1", "v1", "w2")]
    experts = getattr(module, "num_experts", None)
    if not (isinstance(experts, int) and all(isinstance(p, nn.Parameter) and p.dim() == 2 for p in params)):
        return False
    return len({tuple(p.shape) for p in params}) == 1 and params[0].shape[0] % experts == 0 and isinstance(
        getattr(mlp, "activation_fn", None), nn.Module)


def _layout(module: nn.Module) -> str | None:
    """Which fused-experts layout ``module`` holds: ``"dbrx"``, ``"routed"`` (Mixtral), ``"dense"`` (Llama 4),
    ``"gpt_oss"``, ``"unknown"`` (3-D parameters of another layout), or None (not a fused experts module)."""
    if _dbrx_layout_ok(module):
        return "dbrx"
    # a stack of at least two matrices; not a convolution's kernel nor a [1, n, H] token or probe (SigLIP's
    # pooling head, ViTs' class tokens)
    if isinstance(module, nn.modules.conv._ConvNd) or not any(
            p.dim() == 3 and p.shape[0] > 1 for p in module.parameters(recurse=False)):
        return None
    for layout, recognised in (("routed", _fused_layout_ok), ("dense", _dense_layout_ok),
                               ("gpt_oss", _gpt_oss_layout_ok)):
        if recognised(module):
            return layout
    return "unknown"


def fused_expert_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names of fused expert modules :func:`unfuse_experts` handles, names it cannot handle)."""
    layouts = [(name, _layout(module)) for name, module in model.named_modules()]
    return ([name for name, layout in layouts if layout not in (None, "unknown")],
            [name for name, layout in layouts if layout == "unknown"])


def _expert_weights(fused: nn.Module, layout: str
                    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], nn.Module]:
    """Per expert (gate [I, H], up [I, H], down [H, I]) and the activation, for the ``dbrx``, ``dense`` and
    ``routed`` layouts."""
    if layout == "dbrx":
        mlp, experts = fused.mlp, fused.num_experts
        w1, v1, w2 = (p.view(experts, -1, p.shape[1]) for p in (mlp.w1, mlp.v1, mlp.w2))
        return [(w1[e], v1[e], w2[e].t()) for e in range(experts)], mlp.activation_fn
    if layout == "dense":  # x @ W: each Linear weight is the transpose
        inter = fused.down_proj.shape[1]
        return [(fused.gate_up_proj[e][:, :inter].t(), fused.gate_up_proj[e][:, inter:].t(), fused.down_proj[e].t())
                for e in range(fused.gate_up_proj.shape[0])], fused.act_fn
    inter = fused.down_proj.shape[2]
    return [(fused.gate_up_proj[e][:inter], fused.gate_up_proj[e][inter:], fused.down_proj[e])
            for e in range(fused.gate_up_proj.shape[0])], fused.act_fn


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def _gpt_oss_experts(fused: nn.Module) -> UnfusedExperts:
    experts = []
    for e in range(fused.gate_up_proj.shape[0]):
        gate_up, bias = fused.gate_up_proj[e], fused.gate_up_proj_bias[e]
        gate = _linear(gate_up[:, ::2].t(), bias[::2])  # gate and up interleaved: even and odd columns
        up = _linear(gate_up[:, 1::2].t(), bias[1::2])
        down = _linear(fused.down_proj[e].t(), fused.down_proj_bias[e])
        experts.append(ClampedSwigluExpert(gate, up, down, float(fused.alpha), float(fused.limit)))
    return UnfusedExperts(experts)


@torch.no_grad()
def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every recognised fused experts module by :class:`UnfusedExperts`; return their names.

    Fused 3-D expert parameters of a layout not recognised are logged as left unquantized.
    """
    names, unknown = fused_expert_modules(model)
    for name in unknown:
        logger.warning("%s holds 3-D expert parameters in a layout quark does not unfuse; its experts "
                       "stay in float (only nn.Linear layers are quantized)", name)
    for name in names:
        fused = model.get_submodule(name)
        layout = _layout(fused)
        if layout == "gpt_oss":
            experts = _gpt_oss_experts(fused)
        else:
            weights, act_fn = _expert_weights(fused, layout)
            kind = DenseUnfusedExperts if layout == "dense" else UnfusedExperts
            experts = kind(ExpertMLP(_linear(g), _linear(u), _linear(d), act_fn) for g, u, d in weights)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, experts)
    if names:
        logger.info("unfused %d MoE experts module(s) into per-expert Linears", len(names))
    return names


__all__ = ["ClampedSwigluExpert", "DenseUnfusedExperts", "ExpertMLP", "UnfusedExperts", "all_experts_see_every_token",
           "fused_expert_modules", "unfuse_experts"]
