"""Benchmark: exported GGUF files run in llama.cpp itself, scored against our PyTorch model.

For each GGUF type, the embedded stories260K model is quantized with the matching config, frozen,
exported with ``ModelExporter.export_gguf_model``, loaded by llama.cpp (``llama-cpp-python``,
built from PyPI's source: ``pip install llama-cpp-python``), and both implementations score the
five in-domain stories (BOS + sentencepiece ids). One JSON line per type: mean NLL in llama.cpp
and in PyTorch, their difference, the share of positions where both pick the same next token,
and the file size. stories260K's 172-wide ``down_proj`` fits no 32-block, so it is written as F16
in the block types (and said so in the row).

Usage: ``python bench/bench_llama_cpp.py``
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers

from quark.torch import LLMTemplate, ModelExporter, ModelQuantizer
from quark.torch.export.config.config import ExporterConfig
from quark.torch.quantization.config.config import Config, QuantizationConfig, QuantizationSpec
from quark.torch.quantization.config.type import Dtype, QSchemeType

MODEL = Path(__file__).resolve().parents[1] / "quark" / "torch" / "llm" / "assets" / "stories260K"
KEEP_FLOAT = ["lm_head", "*down_proj"]


def _config(gguf_type: str) -> Config | None:
    template = LLMTemplate.get("llama")
    if gguf_type == "Q4_1":
        return template.get_config(scheme="uint4_wo_32", exclude_layers=KEEP_FLOAT)
    if gguf_type == "Q4_0":
        return template.get_config(scheme="int4_wo_32", exclude_layers=KEEP_FLOAT)
    if gguf_type == "Q8_0":
        spec = QuantizationSpec(dtype=Dtype.int8, qscheme=QSchemeType.per_group, ch_axis=-1, group_size=32)
        return Config(global_quant_config=QuantizationConfig(weight=spec), exclude=KEEP_FLOAT)
    return None  # F16: the float model, cast by the exporter


def _nll(logits: torch.Tensor, ids: list[int]) -> float:
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="sum").item()


def main() -> None:
    import llama_cpp

    logging.getLogger("transformers").setLevel(logging.ERROR)
    sp = spm.SentencePieceProcessor(model_file=str(MODEL / "tokenizer.model"))
    stories = [s.strip() for s in (MODEL / "calibration.txt").read_text().split("<|endoftext|>") if s.strip()]
    documents = [[1, *sp.encode(s)] for s in stories]
    for gguf_type in ("F16", "Q8_0", "Q4_1", "Q4_0"):
        model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, use_kernels=False).eval()
        config = _config(gguf_type)
        if config is not None:
            ModelQuantizer(config).quantize_model(model, None)
            ModelQuantizer.freeze(model)
        folder = Path(tempfile.mkdtemp()) / gguf_type
        path = ModelExporter(ExporterConfig(), folder).export_gguf_model(
            model, MODEL, "llama", gguf_type="F16" if config is None else None)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False)
        cpp_total = torch_total = 0.0
        agree = tokens = 0
        for ids in documents:
            llm.reset()
            llm.eval(ids)
            cpp = torch.tensor(np.array(llm.scores[: len(ids)]))
            with torch.no_grad():
                ours = model(torch.tensor([ids])).logits[0]
            cpp_total += _nll(cpp, ids)
            torch_total += _nll(ours, ids)
            agree += int((cpp[:-1].argmax(-1) == ours[:-1].argmax(-1)).sum())
            tokens += len(ids) - 1
        row = {"bench": "llama_cpp", "device": platform.machine(), "torch": torch.__version__,
               "llama_cpp_python": llama_cpp.__version__, "model": "stories260K", "gguf_type": gguf_type,
               "nll_llama_cpp": round(cpp_total / tokens, 5), "nll_pytorch": round(torch_total / tokens, 5),
               "nll_difference": round((cpp_total - torch_total) / tokens, 5),
               "next_token_agreement": round(agree / tokens, 4), "tokens": tokens,
               "file_bytes": Path(path).stat().st_size}
        if config is not None:
            row["note"] = "down_proj and the tied embedding/lm_head stay F16/F32"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
