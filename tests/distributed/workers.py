"""What each spawned rank runs in the data-parallel tests (importable by ``spawn``d processes)."""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

#: Case name -> LLMTemplate("llama").get_config keyword arguments.
CASES: dict[str, dict[str, Any]] = {
    "fp8_kv": dict(scheme="fp8", kv_cache_scheme="fp8"),
    "fp8_attention": dict(scheme="fp8", kv_cache_scheme="fp8", attention_scheme="fp8"),
    "fp8_kv_post_rope": dict(scheme="fp8", kv_cache_scheme="fp8"),
    "int8_smoothquant": dict(scheme="int8", algorithm="smoothquant"),
    "int8_autosmoothquant": dict(scheme="int8", algorithm="autosmoothquant"),
    "int4_rtn": dict(scheme="int4_wo_32"),
    "int4_awq": dict(scheme="int4_wo_32", algorithm="awq"),
    "int4_gptq": dict(scheme="int4_wo_32", algorithm="gptq"),
    "quarot_gptq": dict(scheme="int4_wo_32", algorithm="quarot,gptq"),
}
BATCHES = 6


def case_config(case: str) -> Any:
    """The Config of ``case`` (QuaRot through the CLI's scheme builder, as ``--quant_algo quarot,gptq``)."""
    from quark.torch import LLMTemplate
    from quark.torch.llm import schemes

    kwargs = dict(CASES[case])
    if "quarot" in kwargs.get("algorithm", ""):
        request = schemes.SchemeRequest(scheme=kwargs["scheme"], algorithms=kwargs["algorithm"].split(","))
        return schemes.build_config(schemes.template_for("llama"), request)
    config = LLMTemplate.get("llama").get_config(**kwargs)
    config.kv_cache_post_rope = case.endswith("post_rope")
    return config


def quantized_state(case: str, batches: list[torch.Tensor] | None = None, device: str = "cpu",
                    **quantizer_kwargs: Any) -> dict:
    """The frozen tiny Llama's state dict (on the CPU) after ``case`` on ``device`` (on this process's ranks,
    if any)."""
    from quark.torch import ModelQuantizer
    from tests.helpers.tiny_models import tiny_model, token_batches

    model = tiny_model("llama").to(device)
    config = case_config(case)
    quantizer = ModelQuantizer(config, **quantizer_kwargs)
    batches = token_batches(BATCHES) if batches is None else batches
    quantizer.quantize_model(model, [b.to(device) for b in batches])
    quantizer.freeze(model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


GPU_CASES = ("fp8_kv", "int8_smoothquant", "int4_rtn", "int4_awq", "int4_gptq")


def gpu_cases(rank: int, out: Path, results: dict[str, Any]) -> None:
    """The GPU cases on ``cuda:<current>``, with calibration calls merged (the GPU default) and not."""
    from quark.torch.quantization.calibration import batching

    device = f"cuda:{torch.cuda.current_device()}"
    for case in GPU_CASES:
        results[case] = quantized_state(case, device=device)
    merge = batching.MERGE_TOKENS
    batching.MERGE_TOKENS = 0
    try:
        for case in GPU_CASES:
            results[case + ":unmerged"] = quantized_state(case, device=device)
    finally:
        batching.MERGE_TOKENS = merge


def awq_split_state() -> dict:
    """AWQ with one scale candidate per batch (as for 8B-sized groups), so data-parallel ranks take the
    candidates in turns; ``"computed"`` counts the candidate batches this process computed."""
    from quark.torch.algorithm.awq import awq

    size, real = awq.CANDIDATE_BATCH_ELEMENTS, awq.AwqStep._candidate_weights
    computed = [0]

    def counted(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        computed[0] += 1
        return real(self, *args, **kwargs)

    awq.CANDIDATE_BATCH_ELEMENTS = 1
    awq.AwqStep._candidate_weights = counted  # type: ignore[method-assign]
    try:
        return {"state": quantized_state("int4_awq"), "computed": computed[0]}
    finally:
        awq.CANDIDATE_BATCH_ELEMENTS = size
        awq.AwqStep._candidate_weights = real  # type: ignore[method-assign]


def layer_by_layer_state(case: str) -> dict:
    """:func:`quantized_state` with every stage forced to run one decoder layer at a time (the placement
    of a model not wholly on the compute device)."""
    from quark.torch.quantization import api

    real = api.on_device
    api.on_device = lambda module, device: False  # type: ignore[assignment]
    try:
        return quantized_state(case)
    finally:
        api.on_device = real  # type: ignore[assignment]


def run_rank(rank: int, world: int, port: int, out: str, job: Callable[[int, Path, dict], None],
             timeout_s: float, backend: str = "gloo") -> None:
    """Initialise ``backend``, run ``job(rank, out, results)``; save ``results`` (and any error) to
    ``out/rank{rank}.pt``. With NCCL, rank r computes on ``cuda:r``."""
    torch.set_num_threads(1)
    report: dict[str, Any] = {"value": {}, "start": time.perf_counter()}
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        job(rank, Path(out), report["value"])
    except BaseException as error:  # reported to the parent test
        report.update(error=f"{type(error).__name__}: {error}", type=type(error).__name__,
                      trace=traceback.format_exc())
    save(report, Path(out), rank)
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def save(report: dict[str, Any], out: Path, rank: int) -> None:
    report["seconds"] = time.perf_counter() - report["start"]
    torch.save(report, out / f"rank{rank}.pt")


# -- jobs ------------------------------------------------------------------------------------------------
def every_case(rank: int, out: Path, results: dict[str, Any]) -> None:
    """Every case, then two faults: mismatched jobs (refused), and rank 1 dying in the middle of GPTQ."""
    for case in CASES:
        start = time.perf_counter()
        results[case] = quantized_state(case)
        results[case + ":seconds"] = time.perf_counter() - start
    results["int4_awq:split"] = awq_split_state()
    # GPTQ given the same statistics: every rank passes all the batches as its own share
    results["int4_gptq:duplicated"] = quantized_state("int4_gptq", data_already_split=True)
    results["observers"] = observer_ranges(rank)
    results["fp8_kv:layer_by_layer"] = layer_by_layer_state("fp8_kv")
    results["mismatched"] = _error_of(lambda: mismatched_job(rank))
    start = time.perf_counter()
    results["dead"] = _error_of(lambda: dead_rank(rank, out, results))
    results["dead:seconds"] = time.perf_counter() - start


def _error_of(run: Callable[[], Any]) -> dict[str, str] | None:
    try:
        run()
    except Exception as error:
        return {"type": type(error).__name__, "error": str(error)}
    return None


def mismatched_job(rank: int) -> None:
    """Rank 1 passes another config and one batch more."""
    from quark.torch import LLMTemplate, ModelQuantizer
    from tests.helpers.tiny_models import tiny_model, token_batches

    config = LLMTemplate.get("llama").get_config("fp8" if rank == 0 else "int8")
    ModelQuantizer(config).quantize_model(tiny_model("llama"), token_batches(4 + rank))


def dead_rank(rank: int, out: Path, results: dict[str, Any]) -> None:
    """Rank 1 dies (after saving its results) in GPTQ's second decoder layer; rank 0 must fail, not hang."""
    from quark.torch.algorithm.gptq import gptq

    if rank == 1:
        real = gptq.GptqStep.reduce

        def dying(self: Any, layer: Any, index: int, names: Any = None) -> None:
            if index == 1:
                save({"value": results, "start": time.perf_counter()}, out, rank)
                os._exit(3)
            real(self, layer, index, names)

        gptq.GptqStep.reduce = dying  # type: ignore[method-assign]
    quantized_state("int4_gptq")
    (out / "written").write_text("quantized")  # never reached


def observer_data(rank: int | None) -> list[torch.Tensor]:
    """Four activation tensors of growing range (rank 0 sees the first two, rank 1 the last two)."""
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(8, 16, generator=gen) * (1 + i) for i in range(4)]
    return xs if rank is None else xs[2 * rank:2 * rank + 2]


def observer_ranges(rank: int | None) -> dict[str, Any]:
    """qparams of observers fed ``observer_data(rank)``, reduced over the ranks; one that only rank 0 feeds."""
    from quark.torch.quantization.calibration import distributed
    from quark.torch.quantization.config.config import QuantizationSpec
    from quark.torch.quantization.config.type import Dtype, QSchemeType
    from quark.torch.quantization.observer.observer import (
        PerChannelMinMaxObserver,
        PerTensorMinMaxObserver,
        PerTensorMSEObserver,
        PerTensorPercentileObserver,
    )

    per_tensor = QuantizationSpec(dtype=Dtype.int8, qscheme=QSchemeType.per_tensor, symmetric=False)
    per_channel = QuantizationSpec(dtype=Dtype.int8, qscheme=QSchemeType.per_channel, ch_axis=-1)
    observers = {"minmax": PerTensorMinMaxObserver(per_tensor), "per_channel": PerChannelMinMaxObserver(per_channel),
                 "percentile": PerTensorPercentileObserver(per_tensor), "mse": PerTensorMSEObserver(per_tensor),
                 "only_rank0": PerTensorMinMaxObserver(per_tensor)}
    for x in observer_data(rank):
        for name, observer in observers.items():
            if name != "only_rank0" or not rank:
                observer(x)
    distributed.reduce_observers(list(observers.values()))
    return {name: observer.calculate_qparams() for name, observer in observers.items()}


def minmax_qparams(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """qparams of the asymmetric int8 per-tensor min-max observer over ``xs`` in one process."""
    from quark.torch.quantization.config.config import QuantizationSpec
    from quark.torch.quantization.config.type import Dtype, QSchemeType
    from quark.torch.quantization.observer.observer import PerTensorMinMaxObserver

    observer = PerTensorMinMaxObserver(QuantizationSpec(dtype=Dtype.int8, qscheme=QSchemeType.per_tensor,
                                                        symmetric=False))
    for x in xs:
        observer(x)
    return observer.calculate_qparams()
