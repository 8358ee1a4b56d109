"""Where ``quark-quantize`` keeps the model: on ``--device``, in CPU memory with one decoder layer at a
time on ``--device``, or on disk (built on the meta device, each layer read from the checkpoint's
shards in turn, changed layers in an offload folder), chosen before the model is loaded (layer 10)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import psutil
import torch

logger = logging.getLogger(__name__)

OFFLOAD_CHOICES = ("auto", "none", "cpu", "disk")
#: What the device must hold beyond the weights when the whole model sits there: activations of a
#: merged calibration batch, an algorithm's statistics, the allocator's slack.
DEVICE_HEADROOM_FRACTION = 0.15
DEVICE_HEADROOM_BYTES = 4 * 1024**3
#: What host memory must hold beyond the weights for the CPU placement (the Python process, the
#: calibration activations, a layer in flight); ``auto`` picks the disk placement below it.
HOST_HEADROOM_FRACTION = 0.10
HOST_HEADROOM_BYTES = 2 * 1024**3
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def check_offload(offload: str, *, multi_gpu: bool = False) -> None:
    """Refuse an unknown ``--offload`` value, and ``disk`` with ``--multi_gpu``."""
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"--offload={offload!r} is not one of: {', '.join(OFFLOAD_CHOICES)}")
    if offload == "disk" and multi_gpu:
        raise ValueError("--offload disk reads one decoder layer at a time onto --device; it does not combine "
                         "with --multi_gpu (which spreads a model held in memory over the GPUs): drop one of them")


def host_memory_available() -> int:
    """Bytes of host memory available to this process now (``psutil``)."""
    return int(psutil.virtual_memory().available)


def fits_host_memory(need: int) -> tuple[bool, int, int]:
    """``(fits, headroom, available)`` for ``need`` bytes of weights in host memory."""
    available = host_memory_available()
    headroom = max(HOST_HEADROOM_BYTES, int(need * HOST_HEADROOM_FRACTION))
    return need + headroom <= available, headroom, available


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
    """``"device"`` (the whole model on ``device``), ``"cpu"`` (in CPU memory, layers moved to ``device``)
    or ``"disk"`` (on the meta device, layers read from the checkpoint's shards onto ``device``).

    ``auto`` keeps the model on a GPU when its weights plus ``DEVICE_HEADROOM_*`` fit the GPU's free
    memory, in CPU memory when they plus ``HOST_HEADROOM_*`` fit the available host memory, and on
    disk otherwise; the choice is logged.
    """
    check_offload(offload, multi_gpu=multi_gpu)
    if offload == "disk":
        logger.info("placement: the model on disk, one decoder layer at a time read onto %s (--offload disk)", device)
        return "disk"
    if multi_gpu or offload == "none":
        return "device"
    if offload == "cpu":
        if device.type == "cpu":
            return "device"
        logger.info("placement: the model in CPU memory, one decoder layer at a time on %s (--offload cpu)", device)
        return "cpu"
    need = checkpoint_bytes(model_dir, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        headroom = max(DEVICE_HEADROOM_BYTES, int(need * DEVICE_HEADROOM_FRACTION))
        if need + headroom <= free:
            logger.info("placement: the whole model on %s (%.1f GiB of weights, %.1f GiB free)", device,
                        need / 2**30, free / 2**30)
            return "device"
    fits, host_headroom, available = fits_host_memory(need)
    if not fits:
        logger.info("placement: the model on disk, one decoder layer at a time read onto %s (%.1f GiB of weights "
                    "and %.1f GiB of headroom do not fit the %.1f GiB of host memory available; --offload cpu "
                    "forces CPU memory)", device, need / 2**30, host_headroom / 2**30, available / 2**30)
        return "disk"
    if device.type == "cpu":
        return "device"
    logger.info("placement: the model in CPU memory, one decoder layer at a time on %s (%.1f GiB of weights and "
                "%.1f GiB of headroom do not fit the %.1f GiB free; --offload none forces the device)", device,
                need / 2**30, headroom / 2**30, free / 2**30)
    return "cpu"


__all__ = ["OFFLOAD_CHOICES", "check_offload", "checkpoint_bytes", "choose_placement", "fits_host_memory",
           "host_memory_available"]
