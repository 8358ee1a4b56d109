"""Quark for PyTorch: post-training quantization of PyTorch models (LLMs first).

Public entry points: ``ModelQuantizer``, ``LLMTemplate``, ``ModelExporter``, ``ModelImporter``.
They are imported lazily so that ``import quark.torch`` stays cheap and free of side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ModelQuantizer": "quark.torch.quantization.api",
    "LLMTemplate": "quark.torch.quantization.config.template",
    "ModelExporter": "quark.torch.export.api",
    "ModelImporter": "quark.torch.export.api",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quark.torch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
