"""What ``quark-quantize`` does, step by step (layer 10).

1. validate every flag that can be checked without the model (names, paths, output folder, the
   packages each asked output needs);
2. load the config; build the quantization config and check it against the family and every
   asked export; load the tokenizer; check ``--seq_len`` against the model's context;
3. draw the calibration samples (a corpus too small is an error before any work);
4. choose where the model waits (``--offload``), load it; check every layer's shape against its
   config (``--unfit_layers``) and every asked export format against every layer's config: all
   before the first expensive step;
5. evaluate the float model, quantize (or reload an export), evaluate again;
6. freeze and export into a staging folder beside ``--output_dir``, write ``quark_summary.json``,
   and swap the folder into place only at the end (:class:`AtomicFolder`): a failed or interrupted
   run leaves the previous output, and the next run removes its temporary folders.

Under torchrun (a process group of several ranks) every rank runs steps 1-5 on the same samples:
``ModelQuantizer`` splits the calibration batches and reduces the statistics, perplexity splits its
windows and gathers their sums; only rank 0 cleans, freezes, exports and writes (the other ranks
have nothing left to contribute after the last evaluation and return).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quark.torch.export.output_folder import AtomicFolder, check_destination, check_replaceable, clean_leftovers
from quark.torch.llm import datasets as ds
from quark.torch.llm import export_step, moe, perplexity, schemes
from quark.torch.llm.model_loading import (
    EMBEDDED_CALIBRATION_TEXT,
    EMBEDDED_MODEL_DIR,
    TokenizerInfo,
    check_model_dir,
    context_length,
    load_config,
    load_model,
    load_model_on_disk,
    load_tokenizer,
    resolve_device,
)
from quark.torch.llm.placement import check_offload, choose_placement
from quark.torch.llm.summary import (
    SUMMARY_FILE,
    RunSummary,
    folder_bytes,
    package_versions,
    peak_gpu_memory_bytes,
    peak_host_memory_bytes,
)
from quark.torch.quantization.calibration import distributed
from quark.torch.quantization.config.template import LLMTemplate

logger = logging.getLogger(__name__)

DEFAULT_SCHEME = "w_fp8_a_fp8"
# (num_calib_data, seq_len) when the flags are left out
EMBEDDED_CALIBRATION = (4, 256)
MODEL_CALIBRATION = (128, 512)
DEFAULT_DATASET = "pileval"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Evaluation:
    """How (and whether) perplexity is measured."""

    kind: str  # "stories" | "text" | "none"
    source: str | None = None
    explicit: bool = False
    seq_len: int = 2048
    max_windows: int | None = None
    text: str | None = None
    note: str | None = None


def _inputs(args: argparse.Namespace) -> dict[str, Path]:
    """The local inputs of the run, which ``--output_dir`` must neither be nor contain."""
    inputs = {"the embedded model": EMBEDDED_MODEL_DIR}
    for flag in ("model_dir", "import_model_dir", "dataset", "ppl_dataset"):
        value = getattr(args, flag)
        if value is not None and Path(value).exists():
            inputs[f"--{flag}"] = Path(value)
    return inputs


def _previous_output(folder: Path) -> str | None:
    return SUMMARY_FILE if (folder / SUMMARY_FILE).is_file() else None


def _output_folder(args: argparse.Namespace, out: Path) -> AtomicFolder:
    """The staging folder beside ``--output_dir``, swapped into place when the run succeeds."""
    return AtomicFolder(out, args.overwrite, what="--output_dir", marker=_previous_output, marker_name=SUMMARY_FILE,
                        protected=_inputs(args))


def _check_output_dir(args: argparse.Namespace) -> Path | None:
    """``--output_dir`` as given, after the checks publishing will repeat (and cleaning what an
    interrupted run left there); a non-empty folder is replaced only when it holds a previous
    ``quark_summary.json`` and ``--overwrite`` is given."""
    if args.output_dir is None:
        if args.model_export:
            raise ValueError("--model_export needs --output_dir")
        return None
    out = Path(args.output_dir)
    dest = check_destination(out, "--output_dir", _inputs(args))
    if not dest.parent.exists():
        raise ValueError(f"--output_dir={args.output_dir!r}: parent folder {str(dest.parent)!r} does not exist")
    if distributed.rank() == 0:  # the one rank that writes
        clean_leftovers(dest)
    check_replaceable(dest, args.overwrite, "--output_dir", _previous_output, SUMMARY_FILE)
    return out


def _validate(args: argparse.Namespace) -> None:
    """Every check that needs neither the model nor the data."""
    if args.model_reload != bool(args.import_model_dir):
        raise ValueError("--model_reload and --import_model_dir go together (reload the quantized model "
                         "exported to --import_model_dir)")
    if args.model_reload:
        check_model_dir(args.import_model_dir, "--import_model_dir")
        if args.import_file_format not in export_step.IMPORT_FORMATS:
            raise ValueError(f"--import_file_format={args.import_file_format!r} is not one of: "
                             f"{', '.join(export_step.IMPORT_FORMATS)}")
    quantizing = not (args.skip_quantization or args.model_reload)
    if not quantizing:
        for flag in ("quant_algo", "moe_experts_second_step_config", "model_export"):
            if getattr(args, flag):
                raise ValueError(f"--{flag} needs quantization, but --skip_quantization/--model_reload was given")
    if args.quant_scheme is not None:
        schemes.check_scheme(args.quant_scheme)
    schemes.parse_algorithms(args.quant_algo)
    if args.dataset is not None:
        ds.check_dataset(args.dataset)
    export_step.check_export_request(args.model_export or [], args.custom_mode,
                                     getattr(args, "fp8_scale_names", "vllm"))
    if args.model_dir is not None:
        _check_local_model_dir(args.model_dir)
    if args.tasks and not args.skip_evaluation:
        from quark.torch.llm.lm_eval_tasks import check_lm_eval

        check_lm_eval()
    for flag in ("num_calib_data", "seq_len", "batch_size", "group_size", "ppl_seq_len", "ppl_max_windows"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag}={value} must be a positive integer")
    resolve_device(args.device)
    check_offload(args.offload, multi_gpu=args.multi_gpu)
    folder = getattr(args, "offload_folder", None)
    if folder is not None and not Path(folder).is_dir():
        raise ValueError(f"--offload_folder={folder!r} is not an existing directory")


def _check_local_model_dir(value: str) -> None:
    """A hub id given as ``--model_dir`` gets a message saying this build reads local folders only."""
    if not Path(value).exists() and _HUB_ID.match(value):
        local = value.rsplit("/", 1)[1]
        raise ValueError(f"--model_dir={value!r} is not a local folder. It looks like a Hugging Face hub id, but "
                         "this build has no hub access: download the model first (e.g. huggingface-cli download "
                         f"{value} --local-dir ./{local}) and pass that folder (--model_dir ./{local})")


def _check_rotation(config: Any, hf_config: Any, unfit_layers: str, summary: RunSummary) -> None:
    """QuaRot's online R4 Hadamard needs one of the MLP width; without one, refuse or (keep/fallback)
    run QuaRot without its online Hadamards, before any work."""
    from quark.torch.algorithm.rotation.hadamard import hadamard_matrix
    from quark.torch.quantization.config.config import QuaRotConfig

    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    width = getattr(text, "intermediate_size", None)
    for algo in config.algo_config or []:
        if not isinstance(algo, QuaRotConfig) or not algo.had or not isinstance(width, int):
            continue
        try:
            hadamard_matrix(width)
        except ValueError as exc:
            if unfit_layers == "error":
                raise ValueError(f"--quant_algo quarot: the online Hadamard R4 of the MLP down projection input "
                                 f"needs a Hadamard matrix of size {width} (intermediate_size): {exc}. Pass "
                                 "--unfit_layers keep (or fallback) to run QuaRot without online Hadamards "
                                 "(R1/R2 only), or use --quant_algo rotation") from None
            algo.had = False
            note = (f"QuaRot without online Hadamards (R3/R4): no Hadamard matrix of size {width} "
                    f"(intermediate_size) for the down projection input; --unfit_layers {unfit_layers}")
            logger.warning("%s", note)
            summary.unfit_layers.append({"layer": "*mlp down projection (QuaRot R4)", "action": "keep",
                                         "issues": [note], "changes": ["QuaRotConfig.had: True -> False"]})


def _check_layers(model: nn.Module, config: Any, args: argparse.Namespace, summary: RunSummary) -> None:
    """The KV-cache patterns against the model, shapes against the config (``--unfit_layers``) and the config
    against every asked export."""
    from quark.torch.quantization.api import require_kv_cache_layers
    from quark.torch.quantization.model_transformation import fit_config_to_model

    require_kv_cache_layers(model, config)  # before the float evaluation, not after it
    unfit = fit_config_to_model(model, config)
    summary.unfit_layers += [u.to_dict() for u in unfit]
    export_step.check_export_layers(model, config, args.model_export or [], args.custom_mode)


def _restore_source_settings(model: nn.Module, hf_config: Any) -> None:
    """Loading turned the KV cache off for calibration; the export keeps the source's ``use_cache``."""
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "use_cache") and hasattr(hf_config, "use_cache"):
        model_config.use_cache = hf_config.use_cache


def _evaluation_plan(args: argparse.Namespace, embedded: bool, context: int | None) -> Evaluation:
    if args.skip_evaluation:
        return Evaluation("none", note="skipped (--skip_evaluation)")
    if args.ppl_dataset is None and embedded:
        return Evaluation("stories", str(EMBEDDED_CALIBRATION_TEXT))
    seq_len = args.ppl_seq_len or 2048
    if context is not None and seq_len > context:
        if args.ppl_seq_len is not None:
            raise ValueError(f"--ppl_seq_len={seq_len} is longer than the model's context ({context} tokens)")
        logger.info("perplexity windows of %d tokens (the model's context) instead of 2048", context)
        seq_len = context
    source = args.ppl_dataset or "wikitext"
    plan = Evaluation("text", source, explicit=args.ppl_dataset is not None, seq_len=seq_len,
                      max_windows=args.ppl_max_windows)
    try:
        plan.text = perplexity.evaluation_text(source)
    except ValueError:
        if plan.explicit:
            raise
        note = ("skipped: the default perplexity text 'wikitext' comes from the Hugging Face hub, which this run "
                "cannot read; pass --ppl_dataset FILE (a local text file such as wiki.test.raw) to measure "
                "perplexity, or --skip_evaluation to say so")
        logger.warning("evaluation %s", note)
        return Evaluation("none", note=note)
    return plan


def _evaluate(model: nn.Module, info: TokenizerInfo, plan: Evaluation, stage: str,
              summary: RunSummary, compute_device: torch.device | None = None) -> None:
    if plan.kind == "none":
        return
    desc = f"Perplexity ({stage})"
    if plan.kind == "stories":
        result = perplexity.story_perplexity(model, plan.source, info, desc=desc,  # type: ignore[arg-type]
                                             compute_device=compute_device)
    else:
        result = perplexity.text_perplexity(model, plan.text or "", info, plan.seq_len, plan.max_windows, desc,
                                            compute_device=compute_device)
    logger.info("perplexity (%s): %.4f", stage, result.perplexity)
    summary.evaluation[stage] = {**result.to_dict(), "source": plan.source}


def _calibration(args: argparse.Namespace, embedded: bool, info: TokenizerInfo,
                 context: int | None) -> tuple[list[torch.Tensor], str, int]:
    num, seq_len = EMBEDDED_CALIBRATION if embedded else MODEL_CALIBRATION
    num = args.num_calib_data or num
    if args.seq_len is not None:
        seq_len = args.seq_len
        if context is not None and seq_len > context:
            raise ValueError(f"--seq_len={seq_len} is longer than the model's context ({context} tokens)")
    elif context is not None and seq_len > context:
        logger.info("calibration samples of %d tokens (the model's context) instead of %d", context, seq_len)
        seq_len = context
    dataset = args.dataset or (str(EMBEDDED_CALIBRATION_TEXT) if embedded else DEFAULT_DATASET)
    docs = ds.load_corpus(dataset)
    max_doc = ds.HUB_DATASETS[dataset].max_doc_tokens if dataset in ds.HUB_DATASETS else None
    samples = ds.calibration_samples(docs, info, num_samples=num, seq_len=seq_len, seed=args.seed,
                                     max_doc_tokens=max_doc, source=dataset)
    return ds.batch_samples(samples, args.batch_size), dataset, seq_len


def run(args: argparse.Namespace) -> RunSummary:
    """Run the whole command; ``ValueError`` for bad input (nothing is written then)."""
    start = time.perf_counter()
    _validate(args)
    out = _check_output_dir(args)
    embedded = args.model_dir is None
    model_dir = EMBEDDED_MODEL_DIR if embedded else check_model_dir(args.model_dir)
    hf_config = load_config(model_dir, args.trust_remote_code)
    model_type = LLMTemplate.get_model_type(hf_config)
    context = context_length(hf_config)
    mode = "reload" if args.model_reload else "float" if args.skip_quantization else "quantize"
    summary = RunSummary(model="embedded stories260K" if embedded else str(model_dir), model_type=model_type,
                         mode=mode, seed=args.seed, versions=package_versions(),
                         command_line=getattr(args, "command_line", None))
    request: schemes.SchemeRequest | None = None
    config: Any = None
    if mode == "quantize":
        default_kv = "fp8" if embedded and args.quant_scheme is None else None
        request = schemes.SchemeRequest(
            scheme=args.quant_scheme or DEFAULT_SCHEME, group_size=args.group_size,
            kv_cache_dtype=args.kv_cache_dtype or default_kv, algorithms=schemes.parse_algorithms(args.quant_algo),
            exclude_layers=args.exclude_layers, moe_second_step=args.moe_experts_second_step_config,
            min_kv_scale=args.min_kv_scale, extra_exclude=schemes.text_only_excludes(hf_config),
            kv_cache_post_rope=args.kv_cache_post_rope, unfit_layers=getattr(args, "unfit_layers", "error"))
        template = schemes.template_for(model_type)
        config = schemes.build_config(template, request)
        config.log_severity_level = args.log_severity_level
        export_step.check_export_model(args.model_export or [], model_type, model_dir)
        _check_rotation(config, hf_config, request.unfit_layers, summary)
        note = export_step.fp8_consumer_note(args.custom_mode, getattr(args, "fp8_scale_names", "vllm")) \
            if "hf_format" in (args.model_export or []) else None
        if note:
            logger.warning("%s", note)
            summary.notes.append(note)
    info = load_tokenizer(model_dir, trust_remote_code=args.trust_remote_code,
                          add_bos=args.add_bos)
    evaluation = _evaluation_plan(args, embedded, context)
    summary.evaluation_note = evaluation.note
    batches: list[torch.Tensor] = []
    if mode == "quantize":
        batches, summary.dataset, summary.seq_len = _calibration(args, embedded, info, context)
        summary.calibration_samples = sum(b.shape[0] for b in batches)
    compute = resolve_device(args.device)
    where = choose_placement(model_dir, compute, args.offload, args.model_dtype, args.multi_gpu)
    if where == "disk":
        _check_disk_placement(args, mode)
    summary.placement = {"cpu": f"cpu memory, layers on {compute}", "disk": f"disk, layers on {compute}"}.get(
        where, str(compute))
    args.compute_device = compute
    with contextlib.ExitStack() as stack:
        if where == "disk":
            offload = stack.enter_context(tempfile.TemporaryDirectory(prefix="quark-offload-",
                                                                      dir=getattr(args, "offload_folder", None)))
            model = load_model_on_disk(model_dir, offload, dtype=args.model_dtype,
                                       trust_remote_code=args.trust_remote_code)
        else:
            model = load_model(model_dir, device="cpu" if where == "cpu" else args.device, multi_gpu=args.multi_gpu,
                               dtype=args.model_dtype, trust_remote_code=args.trust_remote_code)
        return _run_loaded(args, model, mode, config, request, info, evaluation, batches, summary, out, model_dir,
                           model_type, hf_config, compute, start)


def _check_disk_placement(args: argparse.Namespace, mode: str) -> None:
    """What the disk placement cannot do, refused before the model is read."""
    what = None
    if mode == "reload":
        what = "--model_reload (the import loads the whole quantized checkpoint)"
    elif args.tasks and not args.skip_evaluation:
        what = "--tasks (lm-eval runs whole-model forwards)"
    elif args.moe_experts_second_step_config:
        what = "--moe_experts_second_step_config (it rounds the expert weights of the whole model in place)"
    elif "onnx" in (args.model_export or []):
        what = "--model_export onnx (the ONNX exporter traces the whole model in memory)"
    if what is not None:
        raise ValueError(f"the disk placement (--offload disk, or auto for a model larger than host memory) does "
                         f"not support {what}; use --offload cpu")


def _run_loaded(args: argparse.Namespace, model: nn.Module, mode: str, config: Any,
                request: schemes.SchemeRequest | None, info: TokenizerInfo, evaluation: Evaluation,
                batches: list[torch.Tensor], summary: RunSummary, out: Path | None, model_dir: Path,
                model_type: str, hf_config: Any, compute: torch.device, start: float) -> RunSummary:
    """Steps 4-6 of the module docstring, on the loaded ``model``."""
    if mode == "quantize":
        _check_layers(model, config, args, summary)
    if not args.skip_float_evaluation:
        _evaluate(model, info, evaluation, "float", summary, compute)

    if mode == "reload":
        summary.unfused_expert_modules = len(moe.unfuse_experts(model))
        model = export_step.import_model(model, Path(args.import_model_dir))
        _evaluate(model, info, evaluation, "reloaded", summary, compute)
    elif request is not None:
        model = _quantize(model, config, request, batches, args, summary)
        _evaluate(model, info, evaluation, "quantized", summary, compute)
    if distributed.rank() > 0:  # data-parallel: rank 0 alone runs lm-eval, exports and writes the summary
        summary.total_seconds = time.perf_counter() - start
        return summary
    if distributed.active():
        summary.notes.append(f"data-parallel calibration and evaluation over {distributed.world_size()} ranks")
    if args.tasks and not args.skip_evaluation:
        from quark.torch.llm.lm_eval_tasks import run_tasks

        summary.lm_eval = run_tasks(model, info.tokenizer, args.tasks, args.eval_batch_size, args.lm_eval_limit)

    summary.peak_host_memory_bytes = peak_host_memory_bytes()
    summary.peak_gpu_memory_bytes = peak_gpu_memory_bytes()
    if out is not None:
        with _output_folder(args, out) as folder:
            staging = folder.path
            if args.model_export:
                from quark.torch import ModelQuantizer

                ModelQuantizer.freeze(model)
                _restore_source_settings(model, hf_config)
                sample = batches[0][:1] if batches else torch.tensor([[info.tokenizer.eos_token_id] * 8])
                summary.exports = export_step.export_model(
                    model, config, info.tokenizer, args.model_export, staging, custom_mode=args.custom_mode,
                    model_type=model_type, model_dir=model_dir, sample=sample,
                    kv_cache_group=list(config.kv_cache_quant_config) or None, min_kv_scale=args.min_kv_scale,
                    fp8_scale_names=getattr(args, "fp8_scale_names", "vllm"))
                summary.exports = {k: str(out / Path(v).relative_to(staging)) for k, v in summary.exports.items()}
            summary.output_dir = str(out)
            summary.total_seconds = time.perf_counter() - start
            summary.output_bytes = folder_bytes(staging)
            summary.write(staging)
    summary.total_seconds = time.perf_counter() - start
    return summary


def _quantize(model: nn.Module, config: Any, request: schemes.SchemeRequest, batches: list[torch.Tensor],
              args: argparse.Namespace, summary: RunSummary) -> nn.Module:
    from quark.torch import ModelQuantizer

    summary.scheme = request.scheme
    summary.algorithms = list(request.algorithms)
    summary.kv_cache_dtype = request.kv_cache_dtype
    summary.moe_second_step = request.moe_second_step
    summary.unfused_expert_modules = len(moe.unfuse_experts(model))
    if request.moe_second_step is not None:
        touched = moe.prequantize_experts(model, config, schemes.EXPERT_LAYER_PATTERNS)
        logger.info("MoE second step: %d expert Linears rounded to the first-step weight spec", len(touched))
    quantizer = ModelQuantizer(config, multi_device=args.multi_gpu, calibrate_all_experts=args.calibrate_all_experts,
                               compute_device=args.compute_device)
    model = quantizer.quantize_model(model, batches)
    summary.quantized_layers = len(quantizer.summary.quantized)
    summary.excluded_layers = list(quantizer.summary.excluded)
    summary.quantize_seconds = quantizer.summary.seconds
    return model


__all__ = ["DEFAULT_SCHEME", "Evaluation", "run"]
