"""Rotation (R1) and QuaRot (R1, R2, online R3 and R4) fused into a float model's weights.

R1 rotates the residual stream by an orthonormal ``Q`` (stream rows ``x`` become ``x Q``): each
stream norm's affine ``γ`` (and ``β``) is folded into the Linears that read it, so the norm is a
plain normalisation that commutes with ``Q``; embeddings and readers get ``W Q``, residual writers
``Qᵀ W`` (bias ``b Q``) and the LM head ``W Q``.

* RMS-norm models (Llama, Qwen2, Mistral, Phi3, ...): ``Q`` is a (randomised) Hadamard matrix.
* LayerNorm models (OPT, ...): a LayerNorm subtracts the mean, which a general ``Q`` does not
  commute with. So the stream is first made mean-free: every writer (embeddings, learned position
  embeddings included, attention and MLP outputs, with their biases) is centred over the hidden
  dimension, ``W ← (I − 11ᵀ/d) W``, ``b ← b − mean(b)``; LayerNorms ignore the mean, so nothing
  changes, and on mean-free input ``LayerNorm(x) = x / rms(x) · γ + β``. ``Q`` is then chosen with
  ``Q·1 = 1`` (:func:`~quark.torch.algorithm.rotation.hadamard.mean_preserving_rotation`): the
  rotated stream stays mean-free and the LayerNorm modules, left in place with ``γ = 1, β = 0``,
  compute exactly what is needed. The model stays a checkpoint of its own architecture.

A norm's bias ``β`` goes into its readers' biases (``b + W β``). When a reader has no bias (OPT's
``lm_head``), its architecture could not reload a new one, so ``β`` stays in the norm, moved to the
rotated basis: ``β ← (β / γ) Q``.

QuaRot adds R2, a rotation of each attention head's values (the rows of ``v_proj``, or the value
slice of a fused ``qkv_proj``, and the matching ``o_proj`` columns); R4 (``had=True``), the online
Hadamard of the MLP writer's input: ``W ← W H`` and the module gets an int8 ±1 ``input_rotation``
buffer applied as ``x @ H / sqrt(n)`` (by QuantLinear; before QuantLinear insertion a forward
pre-hook applies it); R3 (``had=True, kv_cache_quant=True``), a per-head Hadamard of queries and
keys after RoPE: the attention module gets an int8 ``qk_rotation`` buffer that
``quantized_attention_forward`` applies before the K-cache quantizer. ``q·kᵀ`` is unchanged, so R3
only matters when K is quantized after RoPE (``Config.kv_cache_post_rope``).

The structure comes from hooked forwards (:mod:`.structure`), and every check runs before any
weight changes. After rotating, the probe logits are compared with those before: a structure that
was discovered wrongly raises instead of returning a different model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quark.torch.algorithm.rotation.hadamard import hadamard_matrix, mean_preserving_rotation, orthogonal_rotation
from quark.torch.algorithm.rotation.structure import (
    Structure,
    eval_mode,
    find_value_slice,
    model_logits,
    norm_keeps_bias,
)
from quark.torch.algorithm.utils.norms import gain, gain_offset, set_gain
from quark.torch.algorithm.utils.scaling import find_head_dim
from quark.torch.quantization.calibration.layerwise import find_decoder_layers
from quark.torch.quantization.calibration.placement import onloaded, probing, tensors_moved
from quark.torch.quantization.nn.modules.quantize_attention import QK_ROTATION

logger = logging.getLogger(__name__)


def _hint(cfg: Any, name: str) -> tuple[str | None, bool]:
    """(value of a module-path field, whether it is the field's default, i.e. only a hint)."""
    value = getattr(cfg, name, None) or None
    default = None
    if dataclasses.is_dataclass(cfg):
        default = next((f.default for f in dataclasses.fields(cfg) if f.name == name), None)
    return value, value == default


def _linear(layer: nn.Module, name: str | None) -> nn.Linear | None:
    if not name:
        return None
    try:
        m = layer.get_submodule(name)
    except AttributeError:
        return None
    return m if isinstance(m, nn.Linear) else None


def _resolve_linear(layer: nn.Module, cfg: Any, owner: str, field: str) -> str | None:
    """The configured Linear, None when the field keeps its default and names nothing here."""
    name, is_default = _hint(cfg, field)
    if _linear(layer, name) is not None:
        return name
    if name and not is_default:
        raise ValueError(f"{owner}.{field}={name!r} is not an nn.Linear of the decoder layer")
    return None


def _decoder_path(model: nn.Module, cfg: Any) -> str | None:
    path, is_default = _hint(cfg, "model_decoder_layers")
    if path and is_default:
        try:
            model.get_submodule(path)
        except AttributeError:
            return None  # the default ("model.layers") is a hint; OPT keeps them in model.decoder.layers
    return path


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


def _check_orthogonal(owner: str, what: str, r: torch.Tensor, n: int) -> None:
    if tuple(r.shape) != (n, n):
        raise ValueError(f"{owner}: {what} has shape {tuple(r.shape)}, expected {(n, n)}")
    if not torch.allclose(r @ r.t(), torch.eye(n, dtype=r.dtype), atol=1e-4):
        raise ValueError(f"{owner}: {what} is not orthogonal")


@dataclass
class _Plan:
    """Everything rotation will do, decided (and checked) before any weight changes."""

    owner: str
    st: Structure
    r1: torch.Tensor
    r2: torch.Tensor | None = None
    r2_per_layer: list[torch.Tensor | None] = dataclasses.field(default_factory=list)
    value: tuple[str, int, int] | None = None
    o_name: str | None = None
    down_name: str | None = None
    h4: torch.Tensor | None = None
    attn_name: str | None = None
    h3: torch.Tensor | None = None


def _hadamard(owner: str, what: str, n: int) -> torch.Tensor:
    try:
        return hadamard_matrix(n)
    except ValueError as e:
        raise ValueError(f"{owner}: {what} needs a Hadamard matrix of size {n}: {e}") from None


def _plan_quarot(plan: _Plan, cfg: Any) -> None:
    st, owner = plan.st, plan.owner
    layer0 = st.layers[0]
    head_dim = find_head_dim(layer0)
    if head_dim is None:
        raise ValueError(f"{owner}: the attention head size (head_dim) could not be found")
    o_name = _resolve_linear(layer0, cfg, owner, "o_proj") or (st.attention[0] if st.attention else None)
    if o_name is None:
        raise ValueError(f"{owner}: no attention output projection among the residual writers {st.writers}; "
                         "set QuaRotConfig.o_proj")
    v_hint, v_default = _hint(cfg, "v_proj")
    v_name = _resolve_linear(layer0, cfg, owner, "v_proj")
    attn = o_name.rpartition(".")[0]
    plan.o_name = o_name
    plan.value = find_value_slice(layer0, st.args, st.kwargs, attn, o_name, head_dim, v_name,
                                  only_hint=bool(v_hint) and not v_default)
    plan.r2 = orthogonal_rotation(head_dim, random=bool(getattr(cfg, "random2", False)), seed=1)
    for i, r in enumerate(plan.r2_per_layer):
        if r is not None:
            _check_orthogonal(owner, f"R2 of layer {i}", r.double(), head_dim)
    if not bool(getattr(cfg, "had", True)):
        return
    mlp_hint, mlp_default = _hint(cfg, "mlp")
    if mlp_hint and not mlp_default and not _has(layer0, mlp_hint):
        raise ValueError(f"{owner}.mlp={mlp_hint!r} names no module of the decoder layer")
    exists = bool(mlp_hint) and _has(layer0, mlp_hint)
    try:
        plan.down_name = st.mlp_writer(mlp_hint if exists else None, strict=not mlp_default)
    except ValueError as e:
        raise ValueError(f"{owner}.mlp={mlp_hint!r}: {e}") from None
    down = layer0.get_submodule(plan.down_name)
    plan.h4 = _hadamard(owner, f"R4 (the input of {plan.down_name})", down.in_features)
    if not bool(getattr(cfg, "kv_cache_quant", True)):
        return
    attn_hint, attn_default = _hint(cfg, "self_attn")
    if attn_hint and _has(layer0, attn_hint):
        attn = attn_hint
    elif attn_hint and not attn_default:
        raise ValueError(f"{owner}.self_attn={attn_hint!r} names no module of the decoder layer")
    module = layer0.get_submodule(attn) if attn else layer0
    if not hasattr(getattr(module, "config", None), "_attn_implementation"):
        raise ValueError(f"{owner}.kv_cache_quant=True: {type(module).__name__} does not dispatch through "
                         "transformers' attention interface, so the online R3 rotation of queries and keys "
                         "cannot be applied; set kv_cache_quant=False")
    plan.attn_name = attn
    plan.h3 = _hadamard(owner, "R3 (queries and keys per head)", head_dim)


def _has(layer: nn.Module, name: str) -> bool:
    try:
        layer.get_submodule(name)
    except AttributeError:
        return False
    return True


def _plan(model: nn.Module, cfg: Any, quarot: bool) -> _Plan:
    owner = "QuaRotConfig" if quarot else "RotationConfig"
    st = Structure(model, _decoder_path(model, cfg))
    n = st.hidden
    r1, r2_per_layer = None, [None] * len(st.layers)
    path = getattr(cfg, "optimized_rotation_path", None) if quarot else None
    if path:
        r1, r2_per_layer = _load_optimized(path, len(st.layers), st.path)
        _check_orthogonal(owner, "R1", r1, n)
        ones = torch.ones(n, dtype=torch.float64)
        if st.kind == "layer" and not torch.allclose(r1 @ ones, ones, atol=1e-4):
            raise ValueError(f"{owner}: the optimized R1 does not map the all-ones vector to itself, which "
                             "LayerNorm models need (the rotated residual stream must stay mean-free)")
    if r1 is None:
        make = mean_preserving_rotation if st.kind == "layer" else orthogonal_rotation
        try:
            r1 = make(n, random=bool(getattr(cfg, "random", False)))
        except ValueError as e:
            raise ValueError(f"{owner}.random=False: {e}") from None
    plan = _Plan(owner=owner, st=st, r1=r1, r2_per_layer=list(r2_per_layer))
    if quarot:
        _plan_quarot(plan, cfg)
    for layer in st.layers:
        for name, attr in ((plan.down_name, "input_rotation"), (plan.attn_name, QK_ROTATION)):
            if name is not None and getattr(layer.get_submodule(name), attr, None) is not None:
                raise ValueError(f"{owner}: {name} already has an {attr} buffer (the model was rotated before)")
    return plan


class _Work:
    """float64 working copies of weights/biases, written back once (one rounding per tensor)."""

    def __init__(self) -> None:
        self.items: dict[nn.Module, list[torch.Tensor | None]] = {}

    def get(self, m: nn.Module) -> list[torch.Tensor | None]:
        if m not in self.items:
            bias = getattr(m, "bias", None)
            self.items[m] = [m.weight.double(), bias.double() if isinstance(bias, torch.Tensor) else None]
        return self.items[m]

    def flush(self) -> None:
        for m, (w, b) in self.items.items():
            m.weight.copy_(w.to(m.weight.dtype))
            if b is not None:
                m.bias.copy_(b.to(m.bias.dtype))
        self.items.clear()


def _fold_norm(norm: nn.Module, readers: Sequence[nn.Linear], q: torch.Tensor, work: _Work) -> None:
    """Fold ``γ`` (and ``β``) into ``readers``, rotate their inputs by ``q``, make the norm plain."""
    offset = gain_offset(norm)  # Gemma-style norms multiply by 1 + weight
    gamma = gain(norm, offset)
    bias = getattr(norm, "bias", None)
    beta = bias.double() if isinstance(bias, torch.Tensor) else None
    keep = beta is not None and norm_keeps_bias(readers)
    for r in readers:
        item = work.get(r)
        w = item[0]
        if beta is not None and not keep:
            item[1] = item[1] + w @ beta.to(w.device)
        item[0] = (w * gamma.to(w.device)) @ q.to(w.device)
    set_gain(norm, torch.ones_like(gamma), offset)
    if isinstance(bias, torch.Tensor):
        if keep:
            moved = torch.where(gamma != 0, beta / torch.where(gamma != 0, gamma, 1.0), 0.0) @ q.to(gamma.device)
            bias.copy_(moved.to(bias.dtype))
        else:
            bias.zero_()


def _write(m: nn.Linear, q: torch.Tensor, center: bool, work: _Work) -> None:
    item = work.get(m)
    w, b = item
    if center:
        w = w - w.mean(0, keepdim=True)
        b = b - b.mean() if b is not None else None
    qd = q.to(w.device)
    item[0] = qd.t() @ w
    item[1] = b @ qd if b is not None else None


def _block(r: torch.Tensor, n: int) -> torch.Tensor:
    return torch.block_diag(*[r] * (n // r.shape[0]))


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
        x = args[0]
        return ((x @ self.h.to(x.device, x.dtype)) / math.sqrt(self.h.shape[0]), *args[1:])


def _untie(model: nn.Module, st: Structure, undo: list[Callable[[], None]]) -> None:
    shared = st.head.weight
    if not any(e.weight is shared for e in st.embeddings):
        return
    st.head.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    config = getattr(model, "config", None)
    before = getattr(config, "tie_word_embeddings", None)
    if config is not None:
        config.tie_word_embeddings = False

    def retie() -> None:
        st.head.weight = shared
        if config is not None:
            config.tie_word_embeddings = before

    undo.append(retie)


def _add_buffer(module: nn.Module, name: str, value: torch.Tensor, undo: list[Callable[[], None]]) -> None:
    module.register_buffer(name, value)

    def remove() -> None:
        module._buffers.pop(name, None)

    undo.append(remove)


def _apply(model: nn.Module, plan: _Plan, undo: list[Callable[[], None]],
           device: torch.device | str | None = None) -> None:
    st, q = plan.st, plan.r1
    center = st.kind == "layer"
    _untie(model, st, undo)
    work = _Work()
    outside = [*st.embeddings, st.final_norm, st.head]
    with tensors_moved(outside, device) if device is not None else contextlib.nullcontext():
        for emb in st.embeddings:
            w = emb.weight.double()
            if center:
                w = w - w.mean(-1, keepdim=True)
            emb.weight.copy_((w @ q.to(w.device)).to(emb.weight.dtype))
        _fold_norm(st.final_norm, [st.head], q, work)
        work.flush()
    for i, layer in enumerate(st.layers):
        with onloaded(layer, device) if device is not None else contextlib.nullcontext():
            _apply_layer(layer, i, plan, center, work, undo)


def _apply_layer(layer: nn.Module, i: int, plan: _Plan, center: bool, work: _Work,
                 undo: list[Callable[[], None]]) -> None:
    st, q = plan.st, plan.r1
    for prev, readers in st.norm_groups.items():
        _fold_norm(layer.get_submodule(prev), [layer.get_submodule(n) for n in readers], q, work)
    for name in st.writers:
        _write(layer.get_submodule(name), q, center, work)
    if plan.r2 is not None and plan.value is not None and plan.o_name is not None:
        r2 = plan.r2_per_layer[i]
        rot = r2.double() if r2 is not None else plan.r2
        name, start, length = plan.value
        item = work.get(layer.get_submodule(name))
        blk = _block(rot, length).to(item[0].device)
        item[0] = item[0].clone()
        item[0][start:start + length] = blk.t() @ item[0][start:start + length]
        if item[1] is not None:
            item[1] = item[1].clone()
            item[1][start:start + length] = item[1][start:start + length] @ blk
        o = layer.get_submodule(plan.o_name)
        o_item = work.get(o)
        o_item[0] = o_item[0] @ _block(rot, o.in_features).to(o_item[0].device)
    if plan.h4 is not None and plan.down_name is not None:
        down = layer.get_submodule(plan.down_name)
        d_item = work.get(down)
        d_item[0] = d_item[0] @ (plan.h4 / math.sqrt(plan.h4.shape[0])).to(d_item[0].device)
        _add_buffer(down, "input_rotation", plan.h4.to(torch.int8).to(down.weight.device), undo)
        handle = down.register_forward_pre_hook(_InputRotationHook(down.input_rotation))
        undo.append(handle.remove)
    if plan.h3 is not None and plan.attn_name is not None:
        attn = layer.get_submodule(plan.attn_name)
        device = next(attn.parameters()).device
        _add_buffer(attn, QK_ROTATION, plan.h3.to(torch.int8).to(device), undo)
    work.flush()


def _verify(model: nn.Module, plan: _Plan) -> None:
    st = plan.st
    new = model_logits(model, st.ids).double()
    ref = st.ref_logits.double()
    # Relative L2 error: float32 ~1e-6, bfloat16 ~1e-2 (measured); a wrong structure gives ~1.
    err = float((new - ref).norm()) / max(float(ref.norm()), 1e-12)
    rel = 1e-3 if st.head.weight.dtype in (torch.float32, torch.float64) else 0.1
    if not err <= rel:
        raise RuntimeError(f"{plan.owner}: after rotation the logits of {type(model).__name__} differ from the "
                           f"original ones (relative error {err:.2e} > {rel:g}); the discovered structure "
                           f"(writers {st.writers}, norm groups {st.norm_groups}) does not describe this model")
    logger.info("%s: rotated logits match the original ones (relative error %.1e)", plan.owner, err)


def _refuse_other_stream_writers(model: nn.Module) -> None:
    """A vision or audio tower writes its features into the language model's residual stream (image tokens'
    embeddings); text probes never run it, so rotating the stream would leave those features unrotated and
    break every image input while text still checks out. Refused by name."""
    config = getattr(model, "config", None)
    towers = [key for key in ("vision_config", "audio_config") if getattr(config, key, None) is not None]
    if towers:
        raise ValueError(f"rotation: {type(model).__name__} has a {towers[0].split('_')[0]} tower whose outputs "
                         "enter the language model's residual stream; rotating the stream would leave them "
                         "unrotated (image/audio inputs would break), so rotation is not supported for "
                         "multimodal models; use SmoothQuant, AWQ or GPTQ")


@torch.no_grad()
def rotate_model(model: nn.Module, cfg: Any, quarot: bool, device: torch.device | str | None = None) -> None:
    """Fuse R1 (and for QuaRot R2, online R3 and R4) into ``model``; float outputs are preserved.

    ``device``: where the (float64) products run, one decoder layer at a time when the model sits
    elsewhere (default: where each tensor is).

    Raises ``ValueError`` before any change for structures it cannot handle. If the final check
    fails, buffers, hooks and the head/embedding tie are undone and weights are left for the caller
    (``apply_pre_quant_optimization``) to restore from its backup.
    """
    _refuse_other_stream_writers(model)
    with eval_mode(model):
        with probing(model, find_decoder_layers(model, _decoder_path(model, cfg))[1]):
            plan = _plan(model, cfg, quarot)
        undo: list[Callable[[], None]] = []
        try:
            _apply(model, plan, undo, device)
            _verify(model, plan)
        except BaseException:
            for fn in reversed(undo):
                fn()
            raise
    logger.info("%s: R1 (%s norms)%s%s%s fused into %d decoder layers", plan.owner, plan.st.kind,
                "+R2" if plan.r2 is not None else "", "+online R3" if plan.h3 is not None else "",
                "+online R4" if plan.h4 is not None else "", len(plan.st.layers))


def rotation_layers_summary(model: nn.Module, decoder_path: str | None = None) -> dict[str, Any]:
    """The readers/writers rotation would touch (for debugging and tests)."""
    st = Structure(model, decoder_path)
    return {"norm_groups": [f"{p} -> {ls}" for p, ls in st.norm_groups.items()], "writers": st.writers,
            "norm_kind": st.kind, "embeddings": [type(e).__name__ for e in st.embeddings]}
