"""The one table between a frozen ``QuantLinear``'s state and Quark checkpoint tensor names.

Module state (``state_dict`` suffixes)          checkpoint suffix
=============================================  ===================
``weight`` / ``bias``                           ``weight`` / ``bias``
``{t}_quantizer.scale``                         ``{t}_scale``
``{t}_quantizer.zero_point``                    ``{t}_zero_point``
``{t}_scale_2`` / ``{t}_zero_point_2``          the same (two-stage second stage, kept by QuantLinear)
``weight_micro_exponent``                       ``weight_micro_exponent`` (MX6 / MX9)
``input_rotation``                              ``input_rotation`` (QuaRot online R4)
=============================================  ===================

for ``t`` in weight, bias, input, output. The ``{t}_quantizer`` rows are the inverse of transformers'
``quantizer_quark.CHECKPOINT_KEYS``; its renaming stops at name boundaries, so ``_2`` names arrive
unchanged and are module state under the same name. Dtype conventions of the reference checkpoints (scales F32,
8-bit zero points in the code dtype, no zero point for float formats, MX scales as E8M0 bytes)
are applied by :func:`to_checkpoint_tensor` and undone by :func:`from_checkpoint_tensor`.
"""

from __future__ import annotations

import torch

from quark.torch.quantization import formats
from quark.torch.quantization.config.config import QuantizationSpec
from quark.torch.quantization.config.type import Dtype
from quark.torch.quantization.formats.table import format_info

TENSOR_ROLES = ("weight", "bias", "input", "output")
_MODULE_TO_CKPT: dict[str, str] = {}
for _role in TENSOR_ROLES:
    _MODULE_TO_CKPT[f"{_role}_quantizer.scale"] = f"{_role}_scale"
    _MODULE_TO_CKPT[f"{_role}_quantizer.zero_point"] = f"{_role}_zero_point"
    _MODULE_TO_CKPT[f"{_role}_scale_2"] = f"{_role}_scale_2"
    _MODULE_TO_CKPT[f"{_role}_zero_point_2"] = f"{_role}_zero_point_2"
for _plain in ("weight", "bias", "weight_micro_exponent", "input_rotation"):
    _MODULE_TO_CKPT[_plain] = _plain
MODULE_TO_CHECKPOINT: dict[str, str] = dict(_MODULE_TO_CKPT)
CHECKPOINT_TO_MODULE: dict[str, str] = {v: k for k, v in MODULE_TO_CHECKPOINT.items()}

# transformers' renaming (quantizer_quark.CHECKPOINT_KEYS), kept here to test that we agree with it.
TRANSFORMERS_CHECKPOINT_KEYS: dict[str, str] = {
    f"{role}_{kind}": f"{role}_quantizer.{kind}" for role in TENSOR_ROLES for kind in ("scale", "zero_point")
}


def checkpoint_suffix(module_suffix: str) -> str | None:
    """Checkpoint name of a QuantLinear state suffix, or ``None`` when it is not exported state."""
    return MODULE_TO_CHECKPOINT.get(module_suffix)


def module_suffix(ckpt_suffix: str) -> str | None:
    """QuantLinear state suffix of a checkpoint suffix, or ``None`` when it is not one of ours."""
    return CHECKPOINT_TO_MODULE.get(ckpt_suffix)


def split_role(module_suffix_: str) -> tuple[str, str]:
    """(role, kind) of a quantizer suffix: ``input_quantizer.zero_point`` -> (input, zero_point)."""
    head, _, kind = module_suffix_.rpartition(".")
    role = head.split("_quantizer")[0]
    if ".scale_quantizer" in head:
        kind = f"{kind}_2"
    return role, kind


def is_e8m0_float_spec(spec: QuantizationSpec | None) -> bool:
    """A float element spec whose scales are E8M0 (Quark's ``"dtype": "fp4", "scale_format": "e8m0"``)."""
    return spec is not None and spec.scale_format == "e8m0" and format_info(spec.dtype).kind == "float"


def _zero_point_dtype(spec: QuantizationSpec) -> torch.dtype:
    info = format_info(spec.dtype)
    if info.bits == 8 and info.torch_dtype is not None:
        return info.torch_dtype
    return torch.int32


def to_checkpoint_tensor(kind: str, tensor: torch.Tensor, spec: QuantizationSpec | None) -> torch.Tensor | None:
    """Apply the checkpoint dtype conventions to one quantizer tensor; ``None`` means "not written".

    ``kind`` is ``scale``, ``zero_point``, ``scale_2`` or ``zero_point_2``.
    """
    if spec is None:
        return tensor
    info = format_info(spec.dtype)
    if kind in ("zero_point", "zero_point_2"):
        if info.kind != "int" or kind == "zero_point_2":
            return None  # float formats are symmetric: the reference writes no zero point
        if tensor.dtype == torch.int32 and spec.dtype in (Dtype.int4, Dtype.uint4):
            return tensor  # packed int4 zero points / int4 per-tensor zero point stay int32
        return tensor.to(_zero_point_dtype(spec))
    if kind == "scale":
        if is_e8m0_float_spec(spec) and tensor.is_floating_point():
            codes = formats.float_to_e8m0(tensor)
            if not torch.equal(formats.e8m0_to_float(codes), tensor.float()):
                raise ValueError("an E8M0 (scale_format='e8m0') scale is not a power of two; it cannot be "
                                 "stored as E8M0 bytes")
            return codes
        if tensor.dtype in (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2):
            return tensor  # E8M0 codes / fp8-quantized first-stage scales are stored as they are
        return tensor.to(torch.float32)
    return tensor.to(torch.float32) if tensor.is_floating_point() else tensor


def from_checkpoint_tensor(kind: str, tensor: torch.Tensor, spec: QuantizationSpec | None,
                           target: torch.Tensor) -> torch.Tensor:
    """Undo :func:`to_checkpoint_tensor` for a module tensor shaped/typed like ``target``."""
    if kind == "scale" and is_e8m0_float_spec(spec) and tensor.dtype == torch.uint8 \
            and target.dtype != torch.uint8:
        return formats.e8m0_to_float(tensor).to(target.dtype)
    return tensor.to(target.dtype)


__all__ = [
    "CHECKPOINT_TO_MODULE",
    "MODULE_TO_CHECKPOINT",
    "TENSOR_ROLES",
    "TRANSFORMERS_CHECKPOINT_KEYS",
    "checkpoint_suffix",
    "from_checkpoint_tensor",
    "is_e8m0_float_spec",
    "module_suffix",
    "split_role",
    "to_checkpoint_tensor",
]
