"""Where the algorithm layer (7) hands its two entry points to ``ModelQuantizer`` (layer 8).

``quark.torch.algorithm.api`` registers ``apply_pre_quant_optimization`` and
``apply_advanced_algorithm`` here when it is imported, so that nothing in ``quark.torch.quantization``
imports the algorithm package. The first lookup imports that package by name when nobody has yet
(a plain ``from quark.torch.quantization.api import ModelQuantizer`` works on its own).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

STAGES = ("pre_quant", "advanced")
ALGORITHM_PACKAGE = "quark.torch.algorithm.api"

_RUNNERS: dict[str, Callable[..., Any]] = {}


def register_algorithm_runner(stage: str, runner: Callable[..., Any]) -> None:
    """Make ``runner`` the entry point of ``stage`` (one of :data:`STAGES`)."""
    if stage not in STAGES:
        raise ValueError(f"algorithm stage {stage!r} is not one of: {', '.join(STAGES)}")
    _RUNNERS[stage] = runner


def algorithm_runner(stage: str) -> Callable[..., Any]:
    """The registered entry point of ``stage``, importing the algorithm package first if needed."""
    if stage not in STAGES:
        raise ValueError(f"algorithm stage {stage!r} is not one of: {', '.join(STAGES)}")
    if stage not in _RUNNERS:
        importlib.import_module(ALGORITHM_PACKAGE)
    if stage not in _RUNNERS:
        raise RuntimeError(f"{ALGORITHM_PACKAGE} registered no runner for the {stage!r} stage")
    return _RUNNERS[stage]


__all__ = ["STAGES", "algorithm_runner", "register_algorithm_runner"]
