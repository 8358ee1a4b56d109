"""The two entry points ``ModelQuantizer`` calls (layer 7 -> layer 8).

* :func:`apply_pre_quant_optimization` runs on the float model before quantizers are inserted:
  SmoothQuant, AutoSmoothQuant, Rotation, QuaRot (weights change, their dtype does not).
* :func:`apply_advanced_algorithm` runs after QuantLinear insertion: AWQ, GPTQ. GPTQ fixes each
  weight quantizer's grid with ``weight_quantizer.set_qparams``; AWQ leaves scaled, clipped float
  weights for calibration to observe.

Both validate every config against the model before any weight changes and, if a run fails
part-way, restore the weights they touched from copies on disk (``ModelBackup``: written in the
background, never a second copy of the model in host memory).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from quark.torch.algorithm.awq.awq import AwqProcessor
from quark.torch.algorithm.awq.smooth import AutoSmoothQuantProcessor, SmoothQuantProcessor
from quark.torch.algorithm.gptq.gptq import GptqProcessor
from quark.torch.algorithm.rotation.rotation import rotate_model
from quark.torch.quantization.algorithm_registry import register_algorithm_runner
from quark.torch.quantization.calibration.layerwise import ModelBackup

logger = logging.getLogger(__name__)

_PRE = ("SmoothQuantConfig", "AutoSmoothQuantConfig", "RotationConfig", "QuaRotConfig")
_ADVANCED = ("AWQConfig", "GPTQConfig")
_SMOOTHING = ("SmoothQuantConfig", "AutoSmoothQuantConfig")
_ROTATIONS = ("RotationConfig", "QuaRotConfig")


def _kind(cfg: Any, allowed: Sequence[str], stage: str) -> str:
    for cls in type(cfg).__mro__:
        if cls.__name__ in allowed:
            return cls.__name__
    raise ValueError(f"{stage}: {type(cfg).__name__} is not one of: {', '.join(allowed)}")


def _warn_scaling_before_rotation(kinds: Sequence[str]) -> None:
    """Configs run in list order; a rotation after a smoothing step mixes the channels it balanced."""
    rotations = [i for i, k in enumerate(kinds) if k in _ROTATIONS]
    for i, kind in enumerate(kinds):
        later = [kinds[j] for j in rotations if j > i]
        if kind in _SMOOTHING and later:
            logger.warning("Config.pre_quant_opt_config runs %s before %s: the rotation mixes the channels that "
                           "%s balanced, so its per-channel scales no longer line up with the outliers; list "
                           "the rotation first (e.g. --quant_algo quarot,smoothquant)", kind, later[0], kind)


def apply_pre_quant_optimization(model: nn.Module, configs: list, config: Any, batches: list,
                                 device: torch.device | str) -> None:
    """Apply each pre-quantization optimization in ``configs`` to the float ``model`` in order."""
    kinds = [_kind(c, _PRE, "Config.pre_quant_opt_config") for c in configs]
    _warn_scaling_before_rotation(kinds)
    backup = ModelBackup()
    try:
        for cfg, kind in zip(configs, kinds):
            logger.info("pre-quant optimization: %s", kind)
            if kind == "SmoothQuantConfig":
                SmoothQuantProcessor(model, cfg, batches, config, device).apply(backup)
            elif kind == "AutoSmoothQuantConfig":
                AutoSmoothQuantProcessor(model, cfg, batches, config, device).apply(backup)
            else:
                backup.save(model)
                rotate_model(model, cfg, quarot=kind == "QuaRotConfig", device=device)
    except BaseException:
        backup.restore()
        raise
    else:
        backup.discard()
    finally:
        backup.close()


def apply_advanced_algorithm(model: nn.Module, configs: list, config: Any, batches: list,
                             device: torch.device | str) -> None:
    """Apply AWQ / GPTQ (``configs``) to ``model`` whose linears already carry quantizers."""
    kinds = [_kind(c, _ADVANCED, "Config.algo_config") for c in configs]
    processors = [AwqProcessor(model, c, batches, config, device) if k == "AWQConfig"
                  else GptqProcessor(model, c, batches, config, device) for c, k in zip(configs, kinds)]
    steps = [p.build_step() for p in processors]  # every check before any weight changes
    del steps
    backup = ModelBackup()
    try:
        for p, kind in zip(processors, kinds):
            logger.info("advanced algorithm: %s", kind)
            p.apply(backup)
    except BaseException:
        backup.restore()
        raise
    else:
        backup.discard()
    finally:
        backup.close()


register_algorithm_runner("pre_quant", apply_pre_quant_optimization)
register_algorithm_runner("advanced", apply_advanced_algorithm)
