"""Optional ``lm-eval`` (EleutherAI lm-evaluation-harness) tasks on the in-memory model."""

from __future__ import annotations

import importlib.util
from typing import Any

from torch import nn


def check_lm_eval() -> None:
    """``ValueError`` when the ``lm_eval`` package is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError("--tasks needs the lm-eval package (pip install lm-eval); it is not installed")


def run_tasks(model: nn.Module, tokenizer: Any, tasks: str, batch_size: int, limit: int | None) -> dict[str, Any]:
    """Run the comma-separated ``tasks`` with lm-eval's HF wrapper; return its per-task results."""
    check_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=wrapped, tasks=names, limit=limit)
    return dict(results.get("results", {})) if results else {}


__all__ = ["check_lm_eval", "run_tasks"]
