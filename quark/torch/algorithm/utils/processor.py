"""What every algorithm processor holds: the model, its algorithm config, the calibration data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class AlgorithmProcessor:
    """Base of the public processors (``AwqProcessor``, ``GptqProcessor``, ``SmoothQuantProcessor``, ...).

    ``data`` is the list of calibration batches; ``quant_config`` the full ``Config`` (for the
    weight specs); ``device`` where each decoder layer runs (default: the model's device).
    """

    def __init__(self, model: nn.Module, algo_config: Any, data: Sequence[Any], quant_config: Any = None,
                 device: torch.device | str | None = None) -> None:
        self.model = model
        self.cfg = algo_config
        self.data = list(data)
        self.quant_config = quant_config
        self.device = device or next(model.parameters()).device
