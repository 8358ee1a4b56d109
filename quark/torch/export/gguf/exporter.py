"""GGUF export of Llama-family models through the ``gguf`` package (llama.cpp's own writer).

Quantized Linear weights are written in the GGML block type that holds them exactly up to the
float16 rounding of the block scales (GGML stores scales as fp16):

========================================  =========  ===============================
quantization                              GGML type  block (32 weights)
========================================  =========  ===============================
int4 symmetric per_group 32               Q4_0       d, 4-bit q: w = (q - 8) * d
uint4 asymmetric per_group 32             Q4_1       d, m, 4-bit q: w = q * d + m
int8 symmetric per_group 32               Q8_0       d, 8-bit q: w = q * d
anything else / unquantized               F16/BF16/F32 of the dequantized weight (when asked)
========================================  =========  ===============================

Norms stay F32; embeddings and the output head are F16 unless ``gguf_type`` names a float type.
Attention q/k rows are permuted to GGML's rotary layout as llama.cpp's converter does.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quark.torch.export.hf_format.writer import public_model_id
from quark.torch.quantization.calibration.placement import unit_read
from quark.torch.quantization.calibration.weight_source import disk_weights
from quark.torch.quantization.config.type import Dtype, QSchemeType
from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear

logger = logging.getLogger(__name__)

GGUF_TYPES = ("Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "F32")
FLOAT_TYPES = {"F16": np.float16, "F32": np.float32}
SUPPORTED = ("Q4_0 (int4 symmetric per_group 32), Q4_1 (uint4 asymmetric per_group 32), Q8_0 (int8 symmetric "
             "per_group 32), F16 / BF16 / F32 (any weight, dequantized)")
LLAMA_TYPES = ("llama", "mistral")
_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                "post_attention_layernorm": "ffn_norm"}


def spec_block_type(spec: Any) -> str | None:
    """The GGML type that holds weights quantized with ``spec`` (a two-stage list: none), or ``None``."""
    if spec is None or isinstance(spec, (list, tuple)):
        return None
    if spec.qscheme != QSchemeType.per_group or spec.group_size != 32 or spec.ch_axis not in (1, -1):
        return None
    if spec.dtype == Dtype.int4 and spec.symmetric is not False:
        return "Q4_0"
    if spec.dtype == Dtype.uint4 and spec.symmetric is False:
        return "Q4_1"
    if spec.dtype == Dtype.int8 and spec.symmetric is not False:
        return "Q8_0"
    return None


def _block_type(module: QuantLinear) -> str | None:
    """The GGML type that holds ``module``'s quantized weight, or ``None``."""
    wq = module.weight_quantizer
    if wq is None or wq.scale_quantizer is not None:
        return None
    return spec_block_type(wq.spec)


def _codes(module: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integer codes [out, in], scales [out, in/32] and zero points of a per-group weight."""
    from quark.torch.export.onnx.exporter import _canonical_weight_qparams

    w = module.quantized_weight(torch.float32).cpu()
    scale, zero_point = _canonical_weight_qparams(module)
    scale = scale.cpu()
    zero_point = None if zero_point is None else zero_point.cpu()
    s = scale.float().repeat_interleave(32, dim=1)
    zp = None if zero_point is None else zero_point.float().repeat_interleave(32, dim=1)
    codes = torch.round(w / s) + (0 if zp is None else zp)
    return codes, scale.float(), zero_point


def _pack_blocks(module: QuantLinear, kind: str) -> np.ndarray:
    """GGML blocks (uint8 [out, in/32 * bytes]) holding the module's codes and fp16 scales."""
    codes, scale, zero_point = _codes(module)
    out, n = codes.shape
    q = codes.reshape(out, n // 32, 32).numpy()
    d = scale.numpy().astype(np.float16).reshape(out, n // 32, 1).view(np.uint8)
    if kind == "Q8_0":
        return np.concatenate([d, q.astype(np.int8).view(np.uint8)], axis=-1).reshape(out, -1)
    if kind == "Q4_0":
        q = q + 8  # signed int4 -> the block's unsigned nibble with implicit offset 8
        head = [d]
    else:
        zp = zero_point.float().numpy().reshape(out, n // 32, 1)
        m = (-zp * scale.numpy().reshape(out, n // 32, 1)).astype(np.float16).view(np.uint8)
        head = [d, m]
    q = q.astype(np.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # low nibbles: first 16 weights of the block
    return np.concatenate([*head, nibbles], axis=-1).reshape(out, -1)


def _permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary half-split rows -> GGML's interleaved rows (llama.cpp's ``permute``)."""
    rows = x.shape[0]
    return x.reshape(n_head, 2, rows // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))


def _add_tokenizer(writer: Any, tokenizer_path: Path, cfg: Any, vocab_size: int) -> None:
    import gguf
    import sentencepiece

    model_file = tokenizer_path / "tokenizer.model" if tokenizer_path.is_dir() else tokenizer_path
    if not model_file.is_file():
        raise ValueError(f"GGUF export needs a SentencePiece tokenizer.model; none at {model_file}")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i >= sp.vocab_size():
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for getter, adder in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        value = getattr(cfg, getter, None)
        if isinstance(value, int):
            adder(value)
    if sp.unk_id() >= 0:
        writer.add_unk_token_id(sp.unk_id())


def export_gguf(model: nn.Module, tokenizer_path: Path, model_type: str, path: Path,
                gguf_type: str | None = None) -> Path:
    """Write ``model`` (a Llama-family transformers model, quantized or not) to ``path``."""
    import gguf

    if model_type not in LLAMA_TYPES:
        raise ValueError(f"export_gguf_model(model_type={model_type!r}) is not supported; supported: "
                         f"{', '.join(LLAMA_TYPES)}")
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is not one of: {', '.join(GGUF_TYPES)}")
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise ValueError(f"{type(model).__name__} is not a Llama-family transformers model (model.model.layers)")
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    float_type = gguf_type if gguf_type in ("F16", "BF16", "F32") else "F16"
    plans: list[tuple[str, str, str]] = []  # (gguf name, module name, type)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        parts = name.split(".")
        if len(parts) < 5 or parts[1] != "layers":
            raise ValueError(f"{name}: not a Llama decoder Linear; GGUF export supports {', '.join(LLAMA_TYPES)}")
        gname = f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:])]}.weight"
        kind = _block_type(module) if isinstance(module, QuantLinear) else None
        if gguf_type in ("Q4_0", "Q4_1", "Q8_0") and kind != gguf_type:
            raise ValueError(f"{name} cannot be written as {gguf_type}: its quantization is not "
                             f"{gguf_type}'s. GGUF export supports {SUPPORTED}")
        if kind is None and isinstance(module, QuantLinear) and gguf_type is None:
            what = module.weight_quantizer.extra_repr() if module.weight_quantizer else "none"
            raise ValueError(f"{name}: quantization {what} has no GGML block type; pass "
                             f"gguf_type='F16'/'BF16'/'F32' to write it dequantized. GGUF export supports {SUPPORTED}")
        plans.append((gname, name, kind if gguf_type not in ("F16", "BF16", "F32") and kind else float_type))
    entries = _entries(model, cfg, plans, float_type, n_head, n_kv)
    writer = gguf.GGUFWriter(str(path), "llama")
    # general.name: the hub id, never a local folder (an export must not carry local paths)
    writer.add_name(public_model_id(getattr(cfg, "_name_or_path", None)) or model_type)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(_file_type(plans))
    _add_tokenizer(writer, Path(tokenizer_path), cfg, cfg.vocab_size)
    for entry in entries:
        writer.add_tensor_info(entry.name, entry.shape, entry.dtype, entry.nbytes, raw_dtype=entry.raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for unit, group in itertools.groupby(entries, key=lambda e: e.unit):
            with _unit_in_memory(model, unit):
                for entry in group:
                    data = entry.produce()
                    if data.dtype != entry.dtype or data.nbytes != entry.nbytes:
                        raise RuntimeError(f"GGUF {entry.name}: planned {entry.nbytes} bytes of {entry.dtype}, "
                                           f"produced {data.nbytes} of {data.dtype}")
                    writer.write_tensor_data(data)
    finally:
        writer.close()
    logger.info("exported GGUF model to %s", path)
    return path


@dataclass(frozen=True)
class _Entry:
    """One GGUF tensor: its name, the module to have in memory (a placement unit), what ``produce`` returns
    (shape in bytes for block/bf16 types, whose ``raw`` GGML type is given) and how to make it."""

    name: str
    unit: str
    shape: tuple[int, ...]
    dtype: np.dtype
    raw: Any
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def _entries(model: nn.Module, cfg: Any, plans: list[tuple[str, str, str]], float_type: str, n_head: int,
             n_kv: int) -> list[_Entry]:
    """Every tensor of the file in writing order, one placement unit after the other: the token embeddings,
    then each decoder layer's linears and norms, the final norm, the output head (unless tied)."""
    import gguf

    def floating(name: str, unit: str, shape: tuple[int, ...], type_name: str,
                 values: Callable[[], torch.Tensor]) -> _Entry:
        if type_name == "BF16":  # bf16 bit patterns as bytes: gguf's writer has no numpy bfloat16
            def produce() -> np.ndarray:
                bits = values().detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
                return bits.numpy().view(np.uint8).reshape(shape[0], -1)

            return _Entry(name, unit, (shape[0], int(np.prod(shape[1:])) * 2), np.dtype(np.uint8),
                          gguf.GGMLQuantizationType.BF16, produce)
        dtype = np.dtype(FLOAT_TYPES[type_name])
        return _Entry(name, unit, shape, dtype, None,
                      lambda: np.ascontiguousarray(values().detach().to("cpu", torch.float32).numpy().astype(dtype)))

    def norm(name: str, unit: str, module: str) -> _Entry:
        size = model.get_submodule(module).weight.shape
        return _Entry(name, unit, tuple(size), np.dtype(np.float32), None,
                      lambda: model.get_submodule(module).weight.detach().to("cpu", torch.float32).numpy())

    def linear_weight(module_name: str, heads: int | None) -> Callable[[], torch.Tensor]:
        def values() -> torch.Tensor:
            module = model.get_submodule(module_name)
            weight = module.quantized_weight(torch.float32) if isinstance(module, QuantLinear) else module.weight
            weight = weight.detach().to("cpu", torch.float32)
            return weight if heads is None else torch.from_numpy(_permute_rows(weight.numpy(), heads).copy())

        return values

    def blocks(module_name: str, kind: str, heads: int | None) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            data = _pack_blocks(model.get_submodule(module_name), kind)
            return np.ascontiguousarray(data if heads is None else _permute_rows(data, heads))

        return produce

    embed = model.get_submodule("model.embed_tokens")
    entries = [floating("token_embd.weight", "model.embed_tokens", tuple(embed.weight.shape), float_type,
                        lambda: model.get_submodule("model.embed_tokens").weight)]
    by_layer: dict[int, list[tuple[str, str, str]]] = {}
    for plan in plans:
        by_layer.setdefault(int(plan[1].split(".")[2]), []).append(plan)
    for i in range(cfg.num_hidden_layers):
        unit = f"model.layers.{i}"
        for gname, module_name, type_name in by_layer.get(i, []):
            linear = model.get_submodule(module_name)  # a frozen weight is stored packed: its shape is not this
            out_features, in_features = linear.out_features, linear.in_features
            heads = n_head if gname.endswith("attn_q.weight") else n_kv if gname.endswith("attn_k.weight") else None
            if type_name in ("Q4_0", "Q4_1", "Q8_0"):
                raw = getattr(gguf.GGMLQuantizationType, type_name)
                block, block_bytes = gguf.GGML_QUANT_SIZES[raw]
                entries.append(_Entry(gname, unit, (out_features, in_features // block * block_bytes),
                                      np.dtype(np.uint8), raw, blocks(module_name, type_name, heads)))
            else:
                entries.append(floating(gname, unit, (out_features, in_features), type_name,
                                        linear_weight(module_name, heads)))
        for hf, g in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            entries.append(norm(f"blk.{i}.{g}.weight", unit, f"{unit}.{hf}"))
    entries.append(norm("output_norm.weight", "model.norm", "model.norm"))
    if not getattr(cfg, "tie_word_embeddings", False):
        entries.append(floating("output.weight", "lm_head", (model.lm_head.out_features, model.lm_head.in_features),
                                float_type,
                                linear_weight("lm_head", None)))
    return entries


@contextlib.contextmanager
def _unit_in_memory(model: nn.Module, unit: str) -> Iterator[None]:
    """A model on disk: ``unit`` (a decoder layer with its sub-modules, or one module outside them) read into
    CPU memory for the block. Any other model is used where it is."""
    if disk_weights(model) is None:
        yield
        return
    with unit_read(model.get_submodule(unit), "cpu", whole=unit.startswith("model.layers.")):
        yield


def _file_type(plans: list[tuple[str, str, str]]) -> int:
    import gguf

    kinds = {t for _, _, t in plans}
    for name, value in (("Q4_1", gguf.LlamaFileType.MOSTLY_Q4_1), ("Q4_0", gguf.LlamaFileType.MOSTLY_Q4_0),
                        ("Q8_0", gguf.LlamaFileType.MOSTLY_Q8_0), ("BF16", gguf.LlamaFileType.MOSTLY_BF16),
                        ("F32", gguf.LlamaFileType.ALL_F32)):
        if name in kinds:
            return int(value)
    return int(gguf.LlamaFileType.MOSTLY_F16)


__all__ = ["GGUF_TYPES", "LLAMA_TYPES", "SUPPORTED", "export_gguf", "spec_block_type"]
