"""Rotation (R1) and QuaRot (R1, R2, online R4) fused into a float model's weights.

R1 rotates the residual stream by an orthonormal ``Q``: norms' weights are first folded into the
linears that read them (so every norm is a plain RMS normalisation, which commutes with ``Q``),
then embeddings and readers get ``W Q``, residual writers ``Qᵀ W`` (bias ``b Q``) and the LM head
``W Q``. R2 rotates each attention head's values (v rows, o columns per head). R4 (``had=True``)
rotates the input of the MLP's residual writer online: ``W ← W H`` and the module gets an
``input_rotation`` buffer (±1 Hadamard, applied as ``x @ H / sqrt(n)``) that QuantLinear applies;
before QuantLinear insertion a forward pre-hook applies it. Float outputs are unchanged up to
float error. Structure is found from one hooked forward (which linears read a norm's output,
which write the residual stream): no family tables.

Only RMS-normalised models are supported (a LayerNorm's mean subtraction does not commute with a
rotation); others raise ``ValueError`` before any weight changes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quark.torch.algorithm.rotation.hadamard import hadamard_matrix, orthogonal_rotation
from quark.torch.algorithm.utils.model_info import _norm_like, discover_scaling_groups
from quark.torch.algorithm.utils.scaling import find_head_dim, fold_norm_into_fcs
from quark.torch.quantization.calibration.layerwise import (
    capture_decoder_inputs,
    find_decoder_layers,
    float_linears,
    layer_output_tensor,
    move_to,
)

logger = logging.getLogger(__name__)


def _is_rms(norm: nn.Module, n: int) -> bool:
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(0))
    w = norm.weight
    x = x.to(w.device, w.dtype)
    with torch.no_grad():
        return not torch.allclose(norm(x), norm(x + 3.0), atol=1e-4)


def _norm_inputs_and_output(layer: nn.Module, args: tuple, kwargs: dict,
                            perturb: tuple[nn.Module, torch.Tensor] | None = None) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a: seen.setdefault(id(mod), a[0]))
               for m in layer.modules() if _norm_like(m)]
    if perturb is not None:
        handles.append(perturb[0].register_forward_hook(lambda mod, a, out: out + perturb[1]))
    try:
        with float_linears(layer), torch.no_grad():
            out = layer_output_tensor(layer(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return [*seen.values(), out]


def _residual_writers(layer: nn.Module, args: tuple, kwargs: dict, hidden: int) -> list[str]:
    """Linears whose output is added unchanged to the residual stream (seen at a norm or the output)."""
    base = _norm_inputs_and_output(layer, args, kwargs)
    writers = []
    for name, m in layer.named_modules():
        if not isinstance(m, nn.Linear) or m.out_features != hidden:
            continue
        delta = torch.randn(hidden, generator=torch.Generator().manual_seed(2)).to(base[-1].device, base[-1].dtype)
        after = _norm_inputs_and_output(layer, args, kwargs, (m, delta))
        if any(a.shape == b.shape and torch.allclose(a - b, delta.expand_as(a), atol=1e-4, rtol=1e-3)
               for a, b in zip(after, base)):
            writers.append(name)
    return writers


class _Structure:
    """What rotation needs to know about the model, found before any weight changes."""

    def __init__(self, model: nn.Module, decoder_path: str | None) -> None:
        self.path, self.layers = find_decoder_layers(model, decoder_path)
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if emb is None or head is None:
            raise ValueError("rotation needs a model with input and output embeddings (a causal LM)")
        self.embedding, self.head = emb, head
        self.hidden = emb.weight.shape[1]
        _, groups = discover_scaling_groups(model, None, self.path)
        self.norm_groups = [(g.prev_op, g.layers) for g in groups
                            if _norm_like(self.layers[0].get_submodule(g.prev_op))]
        cache = capture_decoder_inputs(model, [_probe_ids(model)], self.layers)
        device = next(self.layers[0].parameters()).device
        args, kwargs = move_to(cache.args[0], device), move_to(cache.kwargs[0], device)
        self.writers = _residual_writers(self.layers[0], args, kwargs, self.hidden)
        if not self.writers or not self.norm_groups:
            raise ValueError(f"rotation: {type(self.layers[0]).__name__} has no norm-fed linears or no residual "
                             f"writers (found {self.norm_groups}, {self.writers}); cannot rotate")
        for prev, _ in self.norm_groups:
            if not _is_rms(self.layers[0].get_submodule(prev), self.hidden):
                raise ValueError(f"rotation: {prev} is not an RMS norm (mean subtraction does not commute "
                                 "with a rotation); only RMSNorm models are supported")
        self.final_norm = _final_norm(model, self.layers, head)
        if not _is_rms(self.final_norm, self.hidden):
            raise ValueError("rotation: the final norm is not an RMS norm")


def _get(layer: nn.Module, name: str) -> nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def _probe_ids(model: nn.Module) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))


def _final_norm(model: nn.Module, layers: nn.ModuleList, head: nn.Module) -> nn.Module:
    inside = {id(m) for m in layers.modules()}
    seen: dict[str, torch.Tensor] = {}
    head_in: list[torch.Tensor] = []
    handles = []
    for name, m in model.named_modules():
        if _norm_like(m) and id(m) not in inside:
            handles.append(m.register_forward_hook(lambda mod, a, out, _n=name: seen.__setitem__(_n, out)))
    handles.append(head.register_forward_hook(lambda mod, a, out: head_in.append(a[0])))
    try:
        with torch.no_grad():
            model(_probe_ids(model).to(head.weight.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for name, out in seen.items():
        if head_in and out.shape == head_in[0].shape and torch.equal(out, head_in[0]):
            return model.get_submodule(name)
    raise ValueError("rotation: no final norm feeding the LM head was found")


def _load_optimized(path: str | Path, n_layers: int, prefix: str) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"QuaRotConfig.optimized_rotation_path={str(path)!r}: only .safetensors files are "
                         "read (pickled .bin files are never loaded)")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if "R1" not in tensors:
        raise ValueError(f"{path}: no tensor named 'R1'; keys: {sorted(tensors)[:10]}")
    r2 = [tensors.get(f"{prefix}.{i}.self_attn.R2", tensors.get(f"R2.{i}")) for i in range(n_layers)]
    return tensors["R1"].double(), r2


@torch.no_grad()
def _rotate_in(fc: nn.Linear, q: torch.Tensor) -> None:
    fc.weight.copy_((fc.weight.double() @ q.to(fc.weight.device)).to(fc.weight.dtype))


@torch.no_grad()
def _rotate_out(fc: nn.Linear, q: torch.Tensor) -> None:
    q = q.to(fc.weight.device)
    fc.weight.copy_((q.t() @ fc.weight.double()).to(fc.weight.dtype))
    if fc.bias is not None:
        fc.bias.copy_((fc.bias.double() @ q).to(fc.bias.dtype))


class _InputRotationHook:
    """Applies the online rotation for modules that do not apply ``input_rotation`` themselves.

    A plain ``nn.Linear`` ignores the buffer, so the hook applies it; a QuantLinear applies its own
    buffer in ``forward`` (the hook then does nothing) unless the buffer was not carried over.
    """

    def __init__(self, h: torch.Tensor) -> None:
        self.h = h

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        if type(module) is not nn.Linear and getattr(module, "input_rotation", None) is not None:
            return None
        return _rotate_input(self.h, args)


def _rotate_input(h: torch.Tensor, args: tuple) -> tuple:
    x = args[0]
    return ((x @ h.to(x.device, x.dtype)) / math.sqrt(h.shape[0]), *args[1:])


@torch.no_grad()
def rotate_model(model: nn.Module, cfg: Any, quarot: bool) -> None:
    """Fuse R1 (and for QuaRot R2 and online R4) into ``model``; float outputs are preserved."""
    owner = "QuaRotConfig" if quarot else "RotationConfig"
    decoder_path = getattr(cfg, "model_decoder_layers", None) or None
    st = _Structure(model, decoder_path)
    n_layers = len(st.layers)
    head_dim = find_head_dim(st.layers[0])
    r1, r2_loaded = None, [None] * n_layers
    path = getattr(cfg, "optimized_rotation_path", None) if quarot else None
    if path:
        r1, r2_loaded = _load_optimized(path, n_layers, st.path)
    if r1 is None:
        r1 = orthogonal_rotation(st.hidden, random=bool(getattr(cfg, "random", False)))
    if r1.shape != (st.hidden, st.hidden):
        raise ValueError(f"{owner}: R1 has shape {tuple(r1.shape)}, expected {(st.hidden, st.hidden)}")
    r2 = None
    v_name = getattr(cfg, "v_proj", "self_attn.v_proj")
    o_name = getattr(cfg, "o_proj", "self_attn.o_proj")
    mlp_name = getattr(cfg, "mlp", "mlp")
    had = quarot and bool(getattr(cfg, "had", True))
    if quarot:
        if had and bool(getattr(cfg, "kv_cache_quant", True)):
            raise ValueError("QuaRotConfig.kv_cache_quant=True asks for the online R3 rotation of queries and "
                             "keys, which is not implemented; set kv_cache_quant=False")
        if head_dim is None:
            raise ValueError(f"{owner}: the attention head size (head_dim) could not be found")
        for field, name in (("v_proj", v_name), ("o_proj", o_name)):
            m = _get(st.layers[0], name)
            if not isinstance(m, nn.Linear):
                raise ValueError(f"{owner}.{field}={name!r} is not an nn.Linear of the decoder layer")
        r2 = orthogonal_rotation(head_dim, random=bool(getattr(cfg, "random2", False)), seed=1)
    down_name = None
    h4 = None
    if had:
        down = [w for w in st.writers if w.startswith(mlp_name + ".")]
        if len(down) != 1:
            raise ValueError(f"{owner}: expected one residual writer under {mlp_name!r}, found {down}")
        down_name = down[0]
        n4 = st.layers[0].get_submodule(down_name).in_features
        h4 = hadamard_matrix(n4)  # raises when no Hadamard of this size exists

    # All checks done; from here on weights change.
    if st.head.weight is st.embedding.weight:
        st.head.weight = nn.Parameter(st.head.weight.detach().clone())
        if hasattr(model, "config"):
            model.config.tie_word_embeddings = False
    for layer in st.layers:
        for prev, readers in st.norm_groups:
            fold_norm_into_fcs(layer.get_submodule(prev), [layer.get_submodule(n) for n in readers])
    fold_norm_into_fcs(st.final_norm, [st.head])
    emb = st.embedding.weight
    emb.copy_((emb.double() @ r1.to(emb.device)).to(emb.dtype))
    _rotate_in(st.head, r1)
    for i, layer in enumerate(st.layers):
        for _, readers in st.norm_groups:
            for n in readers:
                _rotate_in(layer.get_submodule(n), r1)
        for n in st.writers:
            _rotate_out(layer.get_submodule(n), r1)
        if r2 is not None:
            rot = r2_loaded[i].double() if r2_loaded[i] is not None else r2
            v, o = layer.get_submodule(v_name), layer.get_submodule(o_name)
            blocks = torch.block_diag(*[rot] * (v.out_features // head_dim))
            _rotate_out(v, blocks)
            _rotate_in(o, torch.block_diag(*[rot] * (o.in_features // head_dim)))
        if h4 is not None and down_name is not None:
            down = layer.get_submodule(down_name)
            _rotate_in(down, h4 / math.sqrt(h4.shape[0]))
            down.register_buffer("input_rotation", h4.to(torch.int8).to(down.weight.device))
            down.register_forward_pre_hook(_InputRotationHook(down.input_rotation))
    logger.info("%s: R1%s%s fused into %d decoder layers", owner, "+R2" if r2 is not None else "",
                "+online R4" if h4 is not None else "", n_layers)


def rotation_layers_summary(model: nn.Module, decoder_path: str | None = None) -> dict[str, Sequence[str]]:
    """The readers/writers rotation would touch (for debugging and tests)."""
    st = _Structure(model, decoder_path)
    return {"norm_groups": [f"{p} -> {ls}" for p, ls in st.norm_groups], "writers": st.writers}
