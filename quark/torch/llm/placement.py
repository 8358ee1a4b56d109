"""Where ``quark-quantize`` keeps the model: on ``--device``, or in CPU memory with one decoder layer at a
time on ``--device`` (``--offload``), chosen before the model is loaded (layer 10)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

OFFLOAD_CHOICES = ("auto", "none", "cpu", "disk")
#: What the device must hold beyond the weights when the whole model sits there: activations of a
#: merged calibration batch, an algorithm's statistics, the allocator's slack.
DEVICE_HEADROOM_FRACTION = 0.15
DEVICE_HEADROOM_BYTES = 4 * 1024**3
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def check_offload(offload: str) -> None:
    """Refuse an unknown ``--offload`` value, and ``disk``, which this release does not have."""
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"--offload={offload!r} is not one of: {', '.join(OFFLOAD_CHOICES)}")
    if offload == "disk":
        raise ValueError("--offload disk (the model on the meta device, each decoder layer read from its "
                         "safetensors shards in turn) is not available in this release; use --offload cpu "
                         "(needs host memory for the model) or a GPU that holds it")


def checkpoint_bytes(model_dir: str | Path, dtype: str = "auto") -> int:
    """Bytes of the model's weights once loaded in ``dtype``: the safetensors (or other weight) files'
    size, scaled when ``dtype`` differs from the checkpoint's ``torch_dtype``."""
    folder = Path(model_dir)
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf")]
    size = sum(p.stat().st_size for p in files)
    stored = None
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        stored = data.get("torch_dtype") or data.get("dtype") if isinstance(data, dict) else None
    if dtype in _DTYPE_BYTES and isinstance(stored, str) and stored in _DTYPE_BYTES:
        size = size * _DTYPE_BYTES[dtype] // _DTYPE_BYTES[stored]
    return size


def choose_placement(model_dir: str | Path, device: torch.device, offload: str, dtype: str = "auto",
                     multi_gpu: bool = False) -> str:
    """``"device"`` (the whole model on ``device``) or ``"cpu"`` (in CPU memory, layers moved to ``device``).

    ``auto`` keeps the model on a GPU when its weights plus ``DEVICE_HEADROOM_*`` fit the GPU's free
    memory, and in CPU memory otherwise; the choice is logged.
    """
    check_offload(offload)
    if device.type == "cpu" or multi_gpu or offload == "none":
        return "device"
    if offload == "cpu":
        logger.info("placement: the model in CPU memory, one decoder layer at a time on %s (--offload cpu)", device)
        return "cpu"
    need = checkpoint_bytes(model_dir, dtype)
    free, _ = torch.cuda.mem_get_info(device)
    headroom = max(DEVICE_HEADROOM_BYTES, int(need * DEVICE_HEADROOM_FRACTION))
    if need + headroom <= free:
        logger.info("placement: the whole model on %s (%.1f GiB of weights, %.1f GiB free)", device, need / 2**30,
                    free / 2**30)
        return "device"
    logger.info("placement: the model in CPU memory, one decoder layer at a time on %s (%.1f GiB of weights and "
                "%.1f GiB of headroom do not fit the %.1f GiB free; --offload none forces the device)", device,
                need / 2**30, headroom / 2**30, free / 2**30)
    return "cpu"


__all__ = ["OFFLOAD_CHOICES", "check_offload", "checkpoint_bytes", "choose_placement"]
