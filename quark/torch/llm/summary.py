"""The end-of-run summary of ``quark-quantize``: a printed table and ``quark_summary.json``."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SUMMARY_FILE = "quark_summary.json"


def peak_host_memory_bytes() -> int:
    """Peak resident memory of this process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_gpu_memory_bytes() -> int | None:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())))


def package_versions() -> dict[str, str | None]:
    """Versions of the packages a result depends on (None when one is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("quark-torch", "torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GiB"


@dataclass
class RunSummary:
    """What one run did; ``evaluation`` maps ``float`` / ``quantized`` / ``reloaded`` to results."""

    model: str
    model_type: str
    mode: str  # quantize | float | reload
    placement: str | None = None  # the device, or "cpu memory, layers on <device>"
    scheme: str | None = None
    algorithms: list[str] = field(default_factory=list)
    kv_cache_dtype: str | None = None
    moe_second_step: str | None = None
    quantized_layers: int = 0
    excluded_layers: list[str] = field(default_factory=list)
    unfused_expert_modules: int = 0
    calibration_samples: int = 0
    seq_len: int | None = None
    dataset: str | None = None
    quantize_seconds: float = 0.0
    total_seconds: float = 0.0
    peak_host_memory_bytes: int = 0
    peak_gpu_memory_bytes: int | None = None
    output_dir: str | None = None
    output_bytes: int | None = None
    exports: dict[str, str] = field(default_factory=dict)
    evaluation: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluation_note: str | None = None
    lm_eval: dict[str, Any] = field(default_factory=dict)
    unfit_layers: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seed: int | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    command_line: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """``to_dict()`` as written into the output folder: no local paths (it is shared with the
        export). Model and dataset keep a hub id, else only their folder/file name; the output
        folder is ``"."`` and exports are relative to it."""
        from quark.torch.export.hf_format.writer import public_model_id

        data = self.to_dict()
        for key in ("model", "dataset"):
            if data[key] is not None:
                data[key] = public_model_id(data[key]) or Path(data[key]).name
        if self.output_dir is not None:
            out = Path(self.output_dir)
            data["output_dir"] = "."
            data["exports"] = {k: str(Path(v).relative_to(out)) if Path(v).is_relative_to(out) else Path(v).name
                               for k, v in self.exports.items()}
        return data

    def write(self, folder: Path) -> Path:
        path = folder / SUMMARY_FILE
        path.write_text(json.dumps(self.public_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    def rows(self) -> list[tuple[str, str]]:
        rows = [("model", f"{self.model} ({self.model_type})"), ("mode", self.mode)]
        if self.placement:
            rows.append(("placement", self.placement))
        if self.mode == "quantize":
            rows += [
                ("scheme", self.scheme or "-"),
                ("algorithms", ", ".join(self.algorithms) or "none"),
                ("kv cache", self.kv_cache_dtype or "not quantized"),
                ("layers quantized / excluded", f"{self.quantized_layers} / {len(self.excluded_layers)}"),
                ("calibration", f"{self.calibration_samples} x {self.seq_len} tokens from {self.dataset}"),
                ("quantization time", f"{self.quantize_seconds:.1f} s"),
            ]
            if self.unfit_layers:
                kept = sum(u["action"] == "keep" for u in self.unfit_layers)
                rows.append(("unfit layers", f"{kept} kept in float, {len(self.unfit_layers) - kept} fallback "
                                             f"(listed in {SUMMARY_FILE})"))
            if self.unfused_expert_modules:
                rows.append(("MoE experts unfused", str(self.unfused_expert_modules)))
            if self.moe_second_step:
                rows.append(("MoE experts second step", self.moe_second_step))
        rows += [("total time", f"{self.total_seconds:.1f} s"),
                 ("peak host memory", _human(self.peak_host_memory_bytes))]
        if self.peak_gpu_memory_bytes is not None:
            rows.append(("peak GPU memory", _human(self.peak_gpu_memory_bytes)))
        if self.output_dir:
            rows.append(("output", f"{self.output_dir} ({_human(self.output_bytes)})"))
        for fmt, path in self.exports.items():
            rows.append((f"export {fmt}", path))
        for stage, result in self.evaluation.items():
            rows.append((f"perplexity {stage}",
                         f"{result['perplexity']:.4f} (nll {result['nll']:.4f}, {result['tokens']} tokens, "
                         f"{result['protocol']})"))
        if "float" in self.evaluation and len(self.evaluation) > 1:
            base = self.evaluation["float"]["perplexity"]
            for stage, result in self.evaluation.items():
                if stage != "float":
                    rows.append((f"ratio {stage}/float", f"{result['perplexity'] / base:.4f}"))
        if self.evaluation_note:
            rows.append(("evaluation", self.evaluation_note))
        for note in self.notes:
            rows.append(("note", note))
        for task, value in self.lm_eval.items():
            rows.append((f"lm-eval {task}", json.dumps(value, sort_keys=True, default=str)))
        return rows

    def table(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 3 + max(len(v) for _, v in rows))
        body = "\n".join(f"{k.ljust(width)} | {v}" for k, v in rows)
        return f"{line}\n{body}\n{line}"


__all__ = ["SUMMARY_FILE", "RunSummary", "folder_bytes", "package_versions", "peak_gpu_memory_bytes",
           "peak_host_memory_bytes"]
