"""What rotation needs to know about a model, found from hooked forwards before any weight changes.

No family tables: one probe forward of the whole model (token ids drawn from the vocabulary) and a
few forwards of the first decoder layer show

* the *stream embeddings*: hidden-sized ``nn.Embedding`` modules outside the decoder whose outputs,
  summed (times one scalar, e.g. Gemma's ``sqrt(d)``), are the first layer's input (OPT: tokens and
  learned positions);
* the *residual writers* of a layer: Linears whose output, perturbed by ``δ``, moves the layer output
  by exactly ``δ``; the layer must be a pre-norm residual block (output = input + Σ writers);
* the *stream norms*: norms whose output is read by Linears (``discover_scaling_groups``), each an
  RMS norm (scale-invariant) or a LayerNorm (also shift-invariant), all of one kind;
* the *final norm*, whose output is the LM head's input.

QuaRot also needs the attention block: its residual writer (``o_proj``), the module that calls the
attention function (``R3``), and which rows of which Linear produce the values read by ``o_proj``
(``R2``; a slice for fused ``qkv_proj``), verified by rotating them with forward hooks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from quark.torch.algorithm.utils.model_info import _norm_like, applies_to, discover_scaling_groups
from quark.torch.algorithm.utils.norms import gain, gain_offset
from quark.torch.algorithm.utils.probe import close, tolerance
from quark.torch.algorithm.utils.scaling import candidate_slices
from quark.torch.quantization.calibration.layerwise import (
    capture_decoder_inputs,
    find_decoder_layers,
    float_linears,
    layer_output_tensor,
    move_to,
)
from quark.torch.quantization.calibration.placement import loaded_on_use

logger = logging.getLogger(__name__)

PROBE_TOKENS = 8


def probe_ids(model: nn.Module) -> torch.Tensor:
    """Fixed token ids used by every structural probe (and the final check)."""
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def norm_kind(norm: nn.Module, n: int) -> str | None:
    """``"rms"`` (scale-invariant), ``"layer"`` (scale- and shift-invariant) or None (neither)."""
    w = norm.weight
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(w.device, w.dtype)
    rel = tolerance(w.dtype)
    with torch.no_grad():
        y = norm(x)
        scale_inv = close(norm(2.5 * x), y, rel)
        shift_inv = close(norm(x + 3.0), y, rel)
    if scale_inv and shift_inv:
        return "layer"
    return "rms" if scale_inv else None


@dataclass
class _Probe:
    layer_input: torch.Tensor | None = None
    embedding_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    norm_outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    head_input: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@torch.no_grad()
def model_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    if device.type == "meta":  # a model on disk: each part read when it runs
        device = torch.device("cpu")
    with eval_mode(model), loaded_on_use(model, device, find_decoder_layers(model)[1]):
        out = model(ids.to(device), use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def _probe(model: nn.Module, layers: nn.ModuleList, head: nn.Module, ids: torch.Tensor) -> _Probe:
    probe = _Probe()
    inside = {id(m) for m in layers.modules()}
    handles = []

    def keep(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, a: tuple, out: torch.Tensor) -> None:
            store.setdefault(name, out)

        return hook

    for name, m in model.named_modules():
        if id(m) in inside or m is head:
            continue
        if isinstance(m, nn.Embedding):
            handles.append(m.register_forward_hook(keep(probe.embedding_outputs, name)))
        elif _norm_like(m):
            handles.append(m.register_forward_hook(keep(probe.norm_outputs, name)))

    def layer_in(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if probe.layer_input is None:
            probe.layer_input = args[0] if args else kwargs.get("hidden_states")

    def head_in(mod: nn.Module, args: tuple) -> None:
        if probe.head_input is None:
            probe.head_input = args[0]

    handles.append(layers[0].register_forward_pre_hook(layer_in, with_kwargs=True))
    handles.append(head.register_forward_pre_hook(head_in))
    try:
        probe.logits = model_logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return probe


def _stream_embeddings(model: nn.Module, probe: _Probe, hidden: int) -> list[str]:
    """Names of the embeddings whose (scaled) sum is the first decoder layer's input."""
    h0 = probe.layer_input
    if h0 is None:
        raise ValueError("rotation: the first decoder layer's input could not be captured")
    cands = {n: o for n, o in probe.embedding_outputs.items() if o.shape[-1] == hidden}
    token = next((n for n, m in model.named_modules() if m is model.get_input_embeddings()), None)
    rel = tolerance(h0.dtype)
    for names in (sorted(cands), [token] if token in cands else []):
        if not names:
            continue
        try:
            s = sum(cands[n].double() for n in names).expand_as(h0)
        except RuntimeError:
            continue
        alpha = float((h0.double() * s).sum() / (s * s).sum().clamp_min(1e-30))
        if close(h0, alpha * s, rel):
            return names
    raise ValueError(
        f"rotation: the first decoder layer's input is not a sum of the hidden-sized ({hidden}) embeddings "
        f"{sorted(cands) or '(none)'}; a projection or norm between the embeddings and the decoder (such as "
        "OPT's project_in when word_embed_proj_dim != hidden_size) is not supported")


def _run_layer(layer: nn.Module, args: tuple, kwargs: dict, names: list[str],
               perturb: tuple[str, torch.Tensor] | None = None,
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """(layer output, outputs of ``names``, inputs of every norm-like module), optionally perturbing one."""
    outs: dict[str, torch.Tensor] = {}
    norm_inputs: list[torch.Tensor] = []
    handles = []
    for name in names:
        def hook(mod: nn.Module, a: tuple, out: torch.Tensor, _n: str = name) -> torch.Tensor:
            if perturb is not None and perturb[0] == _n:
                out = out + perturb[1].to(out.dtype)
            outs.setdefault(_n, out)
            return out

        handles.append(layer.get_submodule(name).register_forward_hook(hook))
    for m in layer.modules():
        if _norm_like(m):
            handles.append(m.register_forward_pre_hook(lambda mod, a: norm_inputs.append(a[0]) and None))
    try:
        with float_linears(layer), torch.no_grad():
            out = layer_output_tensor(layer(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return out, outs, norm_inputs


def residual_writers(layer: nn.Module, args: tuple, kwargs: dict, hidden: int) -> list[str]:
    """Linears whose output is added unchanged to the residual stream; checks the block is pre-norm.

    A writer's perturbation ``δ`` shows up unchanged at a later norm's input or at the layer output;
    the layer output must then be its input plus the writers' outputs (no norm on the residual path).
    """
    cands = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and m.out_features == hidden]
    base, outs, base_norms = _run_layer(layer, args, kwargs, cands)
    rel = tolerance(base.dtype)
    size = max(float(base.abs().max()), 1.0)
    gen = torch.Generator().manual_seed(2)
    writers = []
    for name in cands:
        if name not in outs:
            continue
        delta = (torch.randn(hidden, generator=gen, dtype=torch.float64) * size).to(base.device)
        after, _, norms = _run_layer(layer, args, kwargs, [name], (name, delta))
        # norms over the stream only: per-head norms (Qwen3's q_norm / k_norm) see other widths
        seen = [(a, b) for a, b in zip([*norms, after], [*base_norms, base])
                if a.shape == b.shape and a.shape[-1] == hidden]
        if any(close(a.double() - b.double(), delta.expand_as(b), rel) for a, b in seen):
            writers.append(name)
    x = args[0] if args else kwargs.get("hidden_states")
    cls = type(layer).__name__
    post_norm = ("post-norm blocks, such as OPT with do_layer_norm_before=False, blocks that normalise a "
                 "sub-block's output before adding it, and mixture-of-experts blocks (whose experts' outputs "
                 "are weighted by the router) are not supported")
    if not writers:
        raise ValueError(f"rotation: no Linear of {cls} adds its output unchanged to the residual stream; "
                         f"{post_norm}")
    if not isinstance(x, torch.Tensor) or not close(base, x + sum(outs[w] for w in writers), rel):
        raise ValueError(f"rotation: the output of {cls} is not its input plus its residual writers' outputs "
                         f"({writers}); {post_norm}")
    return writers


def _final_norm(probe: _Probe) -> str:
    x = probe.head_input
    for name, out in probe.norm_outputs.items():
        if x is not None and out.shape == x.shape and torch.equal(out, x):
            return name
    raise ValueError("rotation: the LM head does not read the output of a final norm directly (a projection "
                     "between them, such as OPT's project_out when word_embed_proj_dim != hidden_size, is not "
                     "supported)")


def norm_keeps_bias(readers: Sequence[nn.Module]) -> bool:
    """True when a norm's bias must stay in the norm: a reader has no bias to take it, and a new one
    would not reload into the model's own architecture (OPT's ``lm_head``)."""
    return any(getattr(r, "bias", None) is None for r in readers)


def _attention_writer(layer: nn.Module, writers: list[str]) -> tuple[str, str] | None:
    """(writer, attention module) for the writer whose parent is an attention block."""
    for w in writers:
        parent = w.rpartition(".")[0]
        if parent and "Attention" in type(layer.get_submodule(parent)).__name__:
            return w, parent
    return None


class Structure:
    """Decoder layers, embeddings, norms, writers and head of ``model`` (checked; nothing changed)."""

    def __init__(self, model: nn.Module, decoder_path: str | None) -> None:
        self.path, self.layers = find_decoder_layers(model, decoder_path)
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        if emb is None or not isinstance(head, nn.Linear):
            raise ValueError("rotation needs a causal LM with input embeddings and a Linear output head")
        self.head = head
        self.ids = probe_ids(model)
        probe = _probe(model, self.layers, head, self.ids)
        if probe.layer_input is None or probe.logits is None:
            raise ValueError("rotation: the probe forward did not reach the decoder layers")
        self.ref_logits = probe.logits.detach()
        self.hidden = probe.layer_input.shape[-1]
        if head.in_features != self.hidden:
            raise ValueError(f"rotation: the LM head reads {head.in_features} features, the decoder layers "
                             f"{self.hidden}; a projection between them (such as OPT's project_out when "
                             "word_embed_proj_dim != hidden_size) is not supported")
        self.embeddings = [model.get_submodule(n) for n in _stream_embeddings(model, probe, self.hidden)]
        cache = capture_decoder_inputs(model, [self.ids], self.layers)
        device = next(self.layers[0].parameters()).device
        self.args, self.kwargs = move_to(cache.args[0], device), move_to(cache.kwargs[0], device)
        layer0 = self.layers[0]
        self.writers = residual_writers(layer0, self.args, self.kwargs, self.hidden)
        _, groups = discover_scaling_groups(model, [self.ids], self.path)
        self.norm_groups: dict[str, list[str]] = {}
        for g in (g for g in groups if applies_to(layer0, g)):
            norm = layer0.get_submodule(g.prev_op)
            if _norm_like(norm) and norm.weight.numel() == self.hidden:
                readers = self.norm_groups.setdefault(g.prev_op, [])
                readers.extend(n for n in g.layers if n not in readers)
        if not self.norm_groups:
            raise ValueError(f"rotation: no Linear of {type(layer0).__name__} reads a norm's output; cannot rotate")
        self.final_norm = model.get_submodule(_final_norm(probe))
        kinds = {prev: norm_kind(layer0.get_submodule(prev), self.hidden) for prev in self.norm_groups}
        kinds["final norm"] = norm_kind(self.final_norm, self.hidden)
        bad = [k for k, v in kinds.items() if v is None]
        if bad:
            raise ValueError(f"rotation: {bad} are neither RMS norms nor LayerNorms (their output changes when the "
                             "input is scaled)")
        if len(set(kinds.values())) != 1:
            raise ValueError(f"rotation: the model mixes RMS norms and LayerNorms ({kinds}); not supported")
        self.kind = kinds["final norm"]
        self.attention = _attention_writer(layer0, self.writers)
        for layer in self.layers:
            for prev, readers in self.norm_groups.items():
                self._check_bias_transport(layer.get_submodule(prev), [layer.get_submodule(n) for n in readers])
        self._check_bias_transport(self.final_norm, [head])

    def _check_bias_transport(self, norm: nn.Module, readers: list[nn.Module]) -> None:
        bias = getattr(norm, "bias", None)
        if not isinstance(bias, torch.Tensor) or not norm_keeps_bias(readers):
            return
        if bool(((gain(norm, gain_offset(norm)) == 0) & (bias != 0)).any()):
            raise ValueError(f"rotation: {type(norm).__name__} has channels with weight 0 and a non-zero bias, and "
                             "its readers have no bias to take it; cannot rotate")

    def mlp_writer(self, hint: str | None, strict: bool = False) -> str:
        """The one residual writer under ``hint``; else (unless ``strict``) the one outside the attention."""
        attn = self.attention[1] + "." if self.attention else None
        found = [w for w in self.writers if hint and w.startswith(hint + ".")]
        if not found and not strict:
            found = [w for w in self.writers if attn is None or not w.startswith(attn)]
        if len(found) != 1:
            where = f"under {hint!r}" if strict else "outside the attention block"
            raise ValueError(f"rotation: expected one MLP residual writer {where}, found {found} "
                             f"(writers: {self.writers})")
        return found[0]


def _block(r: torch.Tensor, n: int) -> torch.Tensor:
    return torch.block_diag(*[r] * (n // r.shape[0]))


def _value_slice_ok(layer: nn.Module, args: tuple, kwargs: dict, base: torch.Tensor, producer: str,
                    start: int, length: int, o_name: str, head_dim: int) -> bool:
    q, r = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=torch.Generator().manual_seed(3),
                                       dtype=torch.float64))
    rot = q * torch.sign(torch.diagonal(r))
    o = layer.get_submodule(o_name)

    def on_values(mod: nn.Module, a: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        block = _block(rot, length).to(out.device, out.dtype)
        out[..., start:start + length] = out[..., start:start + length] @ block
        return out

    def on_o(mod: nn.Module, a: tuple) -> tuple:
        return (a[0] @ _block(rot, o.in_features).t().to(a[0].device, a[0].dtype), *a[1:])

    def run(with_o: bool) -> torch.Tensor:
        handles = [layer.get_submodule(producer).register_forward_hook(on_values)]
        if with_o:
            handles.append(o.register_forward_pre_hook(on_o))
        try:
            with float_linears(layer), torch.no_grad():
                return layer_output_tensor(layer(*args, **kwargs))
        finally:
            for h in handles:
                h.remove()

    rel = tolerance(base.dtype)
    return close(run(True), base, rel) and not close(run(False), base, rel)


def find_value_slice(layer: nn.Module, args: tuple, kwargs: dict, attn: str, o_name: str, head_dim: int,
                     hint: str | None, only_hint: bool = False) -> tuple[str, int, int]:
    """(Linear, first row, rows) producing the attention values that ``o_name`` reads, verified by R2 hooks.

    ``hint`` is tried first; with ``only_hint`` (a name the user configured) nothing else is tried.
    """
    o = layer.get_submodule(o_name)
    with float_linears(layer), torch.no_grad():
        base = layer_output_tensor(layer(*args, **kwargs))
    names = [hint] if hint else []
    if not only_hint:
        names += [n for n, m in layer.named_modules()
                  if isinstance(m, nn.Linear) and n.startswith(attn + ".") and n not in (o_name, hint)]
    lengths = [n for n in range(o.in_features, 0, -head_dim) if n % head_dim == 0 and o.in_features % n == 0]
    for name in names:
        for start, length in candidate_slices(layer.get_submodule(name).out_features, lengths):
            if _value_slice_ok(layer, args, kwargs, base, name, start, length, o_name, head_dim):
                return name, start, length
    raise ValueError(f"QuaRotConfig: no Linear of {attn} (tried {names}) produces the attention values read by "
                     f"{o_name}; set QuaRotConfig.v_proj and o_proj to the value and output projections")


__all__ = ["Structure", "find_value_slice", "model_logits", "norm_keeps_bias", "norm_kind", "probe_ids",
           "residual_writers", "tolerance"]
